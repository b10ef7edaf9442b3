"""The event bus: what happened to models and reservations, for `GET /models/events` (server-sent events), the n8n
trigger node and load callbacks.

The orchestrator publishes (`EventBus.publish`); each subscriber (one SSE client) gets its own bounded queue, so a
slow client can never grow the sidecar's memory: when its queue is full it is cut off with an `overflow` event and
reconnects with `Last-Event-ID`, replayed from a bounded ring of recent events. `EVENT_TYPES` is the one list of
event types (the API's query filter and the OpenAPI document derive from it).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from dataclasses import dataclass, field
from datetime import datetime, timezone

# every event type and what it says; `model` is set for every type but `reservation`
EVENT_TYPES: dict[str, str] = {
    "state": "a model changed state (`from`, `to`; `error` when it failed)",
    "load_progress": "a load moved on: `phase` admitted (with gpu, estimate_mb, evicted), restoring (saved "
                     "conversations, `slots`), ready (load_seconds)",
    "loaded": "a load finished: the model serves requests (`load_seconds`, `pid`, `gpu`)",
    "load_failed": "a load failed (`code`, `message`, last log lines in `logs`)",
    "evicted": "a model was unloaded to make room (`by`: the load or reservation that needed it, `reason`)",
    "unloaded": "a model was unloaded (`reason`: request, force, idle, evicted)",
    "crashed": "llama-server exited while serving (`message`, last log lines in `logs`)",
    "memory_low": "a load or reservation was refused for lack of GPU memory (`model`: who asked, `missing_mb`, "
                  "`need_mb`, `gpu`), or a GPU's free memory fell below the margin (`gpu`, `free_mb`, `reason`)",
    "reservation": "a reservation was created, renewed, released or expired (`action`, `reservation`)",
    "estimate_checked": "after a load on a GPU: the estimate against NVML's measurement (`estimate_mb`, "
                        "`measured_mb`, `error_mb`, `learned_overhead_mb`)",
    "slots_saved": "an unload saved the model's conversations to disk (`slots`, `tokens`, `bytes`)",
    "slots_restored": "a load restored saved conversations (`slots`, `tokens`): their prefixes are cached again",
    "download_started": "a load found the model's files missing and began downloading them (`bytes_total`, "
                        "`files`: each file's bytes_done/bytes_total, `resumed_from` what an interrupted one left)",
    "download_progress": "a download moved on (every second while it runs: `bytes_done`, `bytes_total`, `percent`, "
                         "`bytes_per_second`, `eta_s`, `files`)",
    "download_finished": "a download ended with the files in the cache; the load follows (`bytes_done`, `seconds`)",
    "download_failed": "a download failed (`error`: code and message, e.g. insufficient_disk, hub_unreachable)",
    "download_cancelled": "an unload stopped a download (what arrived is kept; the next load resumes it)",
    "lora": "a loaded model's LoRA adapter scales were changed (`scales`: adapter name -> scale)",
    "callback": "a load callback was delivered or given up (`url`, `delivered`, `attempts`, `status`)",
    "queued": "a request (or an explicit load) waits in its model's queue (`waiting`: how many wait now, `state`: "
              "the model's)",
    "granted": "a queued request goes to its model's llama-server (`waited_s`)",
    "expired": "a queued request waited its bound and was refused with 503 queue_timeout (`waited_s`, `waiting_for`)",
}

# an overflowed subscriber gets this as its last event
OVERFLOW = "overflow"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Event:
    id: int
    type: str
    data: dict
    at: str = field(default_factory=_now)

    @property
    def model(self) -> str | None:
        return self.data.get("model")

    def to_dict(self) -> dict:
        return {"id": self.id, "type": self.type, "at": self.at, **self.data}


class Subscription:
    """One client's view of the bus: an async iterator of events matching its filter."""

    def __init__(self, bus: "EventBus", types: frozenset[str] | None, models: frozenset[str] | None, max_queue: int):
        self._bus = bus
        self.types = types
        self.models = models
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(max_queue)
        self.overflowed = False

    def wants(self, event: Event) -> bool:
        return ((self.types is None or event.type in self.types)
                and (self.models is None or event.model is None or event.model in self.models))

    def offer(self, event: Event) -> None:
        if self.overflowed or not self.wants(event):
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            # a client that cannot keep up is cut off (it reconnects with Last-Event-ID) rather than buffered
            self.overflowed = True
            self._drain()
            self.queue.put_nowait(Event(event.id, OVERFLOW, {"message": "this client fell behind; reconnect with "
                                                                       "Last-Event-ID to replay what it missed"}))
            self.queue.put_nowait(None)
            self.close()  # nothing more is offered to it; its stream ends after the overflow notice

    def end(self) -> None:
        self._drain()
        self.queue.put_nowait(None)

    def _drain(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()

    async def next(self, timeout: float) -> Event | None:
        """The next event; raises TimeoutError after `timeout` seconds without one, None once the stream ended."""
        return await asyncio.wait_for(self.queue.get(), timeout)

    def close(self) -> None:
        self._bus._subscribers.discard(self)


class EventBus:
    def __init__(self, *, replay: int = 254, max_queue: int = 256):
        self._ids = itertools.count(1)
        # a replay always fits in a new subscriber's queue (with room for the overflow notice and the end marker)
        self._recent: collections.deque[Event] = collections.deque(maxlen=max(1, min(replay, max_queue - 2)))
        self._subscribers: set[Subscription] = set()
        self.max_queue = max_queue
        self.closed = False

    def publish(self, type_: str, **data) -> Event:
        assert type_ in EVENT_TYPES, type_
        event = Event(next(self._ids), type_, {k: v for k, v in data.items() if v is not None})
        self._recent.append(event)
        for sub in list(self._subscribers):
            sub.offer(event)
        return event

    def subscribe(self, *, types: set[str] | None = None, models: set[str] | None = None,
                  last_event_id: int | None = None) -> Subscription:
        """A new subscription; with `last_event_id`, the recent events after it are queued first."""
        sub = Subscription(self, frozenset(types) if types else None, frozenset(models) if models else None,
                           self.max_queue)
        if self.closed:
            sub.end()
            return sub
        if last_event_id is not None:
            for event in self._recent:
                if event.id > last_event_id:
                    sub.offer(event)
        self._subscribers.add(sub)
        return sub

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def close(self) -> None:
        """End every stream (shutdown): clients see the stream end instead of holding the server open."""
        self.closed = True
        for sub in list(self._subscribers):
            sub.end()
        self._subscribers.clear()
