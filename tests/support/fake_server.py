"""A stand-in for llama-server (lifecycle.LlamaServer's surface), plugged into ManagedModel through its server factory,
and an event loop with a simulated clock: the orchestrator's real scheduler, dispatcher and state machine run over
thousands of requests in seconds, with loads that are ready, slow, crash or hang on demand.

Only for the simulation (tests/test_contention_sim.py, bench/contention_sim.py): the real path runs a real
llama-server everywhere else.
"""

from __future__ import annotations

import asyncio
import selectors
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from types import SimpleNamespace

from model_orchestrator.platform.errors import Code
from model_orchestrator.platform.gpu import GpuDevice, GpuSnapshot
from model_orchestrator.core.lifecycle import ExitInfo, LaunchPlan, LoadFailed


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to the next timer whenever nothing is ready: a simulated minute costs no real
    time. For code that does no real I/O and starts no threads (the simulation patches those out)."""

    def __init__(self) -> None:
        self.virtual_now = 0.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self.virtual_now


class _JumpingSelector(selectors.DefaultSelector):
    def __init__(self, loop: VirtualClockLoop):
        super().__init__()
        self._loop = loop

    def select(self, timeout=None):
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError("simulation stalled: nothing is scheduled and nothing is ready")
        self._loop.virtual_now += timeout
        return []


@dataclass
class Behaviour:
    """How a model's fake llama-server behaves at each launch."""

    load_s: float = 0.2
    crash_at_start: float = 0.0  # probability that it exits during start-up
    hang: float = 0.0  # probability that it never becomes ready (the load times out)
    crash_after_s: float | None = None  # once ready, it exits unexpectedly after this long (None: never)
    need_mb: float = 1000.0  # what its estimate says (GPU mode)


class Served(Exception):
    """A request's serve ended because the fake process ended (crashed, or killed by a force unload)."""

    def __init__(self, exit: ExitInfo):
        super().__init__(exit.reason)
        self.exit = exit


class FakeServer:
    """One fake llama-server process: alive from `start` until it exits; no port, no PID."""

    def __init__(self, fleet: "FakeFleet", model_id: str, plan: LaunchPlan, *, log_lines: int = 400,
                 on_exit: Callable[["FakeServer"], None] | None = None):
        self.fleet, self.model_id, self.plan = fleet, model_id, plan
        self.socket, self.pid = plan.socket, None
        self.on_exit = on_exit
        self.exit: ExitInfo | None = None
        self.stopping = False
        self.marks: dict[str, float] = {}
        self.health_misses = 0
        self.logs: list[str] = []
        self._exited = asyncio.Event()

    def last_logs(self, n: int = 30) -> list[str]:
        return [f"fake llama-server for {self.model_id}"]

    async def start(self, timeout: float) -> None:
        b = self.fleet.behaviour(self.model_id)
        self.fleet.spawned(self)
        rng = self.fleet.rng
        try:
            if rng.random() < b.hang:
                await asyncio.sleep(timeout)
                self._end(-9, "killed by SIGKILL", expected=True)
                raise LoadFailed(f"llama-server for {self.model_id} was not ready after {timeout:g} s",
                                 code=Code.LOAD_TIMEOUT)
            if rng.random() < b.crash_at_start:
                await asyncio.sleep(b.load_s / 2)
                self._end(1, "exited with code 1", expected=False)
                raise LoadFailed(f"llama-server for {self.model_id} exited with code 1 during start-up",
                                 code=Code.PROCESS_EXITED)
            await asyncio.sleep(b.load_s)
        except asyncio.CancelledError:
            self._end(-15, "killed by SIGTERM", expected=True)
            raise
        if b.crash_after_s is not None:
            asyncio.get_running_loop().call_later(b.crash_after_s, self._crash)

    def _crash(self) -> None:
        if self.exit is None:
            self._end(-11, "killed by SIGSEGV", expected=False)

    def _end(self, rc: int, reason: str, *, expected: bool) -> None:
        if self.exit is not None:
            return
        self.exit = ExitInfo(rc, reason, expected, datetime.now(timezone.utc))
        self.fleet.exited(self)
        self._exited.set()
        if self.on_exit:
            self.on_exit(self)

    async def stop(self, timeout: float) -> ExitInfo | None:
        self.stopping = True
        self._end(-15 if timeout else -9, "stopped", expected=True)
        return self.exit

    async def wait_exit(self, timeout: float) -> ExitInfo | None:
        return self.exit

    async def check_health(self, timeout: float) -> str | None:
        return None if self.exit is None else "exited"

    async def serve(self, seconds: float) -> None:
        """A request that takes `seconds`; raises Served when the process ends meanwhile."""
        if self.exit is not None:
            raise Served(self.exit)
        try:
            await asyncio.wait_for(self._exited.wait(), seconds)
        except TimeoutError:
            return
        raise Served(self.exit)


class FakeFleet:
    """The server factory for ManagedModel, and the record a real machine would show: which processes are alive
    (at most how many at once, and how much memory they would hold)."""

    def __init__(self, behaviours: dict[str, Behaviour], rng, *, on_spawn: Callable[["FakeFleet"], None] = None):
        self.behaviours = behaviours
        self.rng = rng
        self.alive: set[FakeServer] = set()
        self.on_spawn = on_spawn
        self.spawns = 0
        self.max_alive = 0

    def behaviour(self, model_id: str) -> Behaviour:
        return self.behaviours.get(model_id, Behaviour())

    def __call__(self, model_id: str, plan: LaunchPlan, *, log_lines: int = 400, on_exit=None) -> FakeServer:
        return FakeServer(self, model_id, plan, log_lines=log_lines, on_exit=on_exit)

    def spawned(self, server: FakeServer) -> None:
        self.alive.add(server)
        self.spawns += 1
        self.max_alive = max(self.max_alive, len(self.alive))
        if self.on_spawn:
            self.on_spawn(self)

    def exited(self, server: FakeServer) -> None:
        self.alive.discard(server)

    def alive_mb(self) -> float:
        return sum(self.behaviour(s.model_id).need_mb for s in self.alive)


class FakeGpu:
    """One GPU of `total_mb`, nobody else on it: memory is what the estimates say (the fake processes have no PID)."""

    available = True
    driver_version = "sim"

    def __init__(self, total_mb: int):
        self._snap = GpuSnapshot(True, [GpuDevice(0, "Simulated GPU", "GPU-sim", total_mb, 0, total_mb, None, None,
                                                  None, None, None)], "sim", taken_at=0.0)

    def snapshot(self, fresh: bool = False) -> GpuSnapshot:
        return self._snap

    def latest(self) -> GpuSnapshot:
        return self._snap


def simulate(orch, fleet: FakeFleet) -> None:
    """Make an Orchestrator (built with `server_factory=fleet` and a FakeGpu or a CPU view) do no file I/O and start
    no thread, as the virtual clock needs: no downloads, no launch plan from files, no prefetch; each model's estimate
    is its Behaviour's need_mb."""
    async def no_download(*a, **k):
        return False

    async def estimate(spec, **k):
        return SimpleNamespace(total_mb=fleet.behaviour(spec.id).need_mb, overhead_mb=0.0, layers_on_gpu=1)

    async def launch(model):
        return LaunchPlan([], {}, None, "sim-key")

    async def snapshot(fresh=False):
        return orch.gpu_view.snapshot()

    def no_files(spec):
        raise FileNotFoundError(spec.id)

    orch.download_on_load.ensure = no_download
    orch.admission.estimate_for_admission = orch.admission.estimate = estimate
    orch._launch_plan = launch
    orch.admission.snapshot = snapshot
    orch.resolve_files = no_files  # no prefetch: no file to read
