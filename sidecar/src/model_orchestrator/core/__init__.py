"""The core: one Orchestrator holding every model (lifecycle: the processes and the state machine), the pure
policies (scheduler: admission and the queue's order) and who carries them out (admission, dispatcher), downloads on
load, the watchdog, reservations, events, saved conversations, calibration and metrics. Imports files/ and platform/,
never server/."""
