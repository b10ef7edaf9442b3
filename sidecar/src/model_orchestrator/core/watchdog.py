"""The watchdog: the orchestrator's background loops, each step logged and counted when it fails, never ended by it.

- `unload_idle_step` (every second): a model unused for its `idle_ttl_s` is unloaded (never one with requests in
  flight); expired reservations are dropped; `memory_low` is published once when a GPU's free memory falls below the
  margin (someone else took it), again only after it recovered.
- `check_health` (every MODEL_ORCHESTRATOR_HEALTH_INTERVAL_S): a loaded llama-server that misses
  MODEL_ORCHESTRATOR_HEALTH_MISSES /health checks in a row (alive but frozen) is marked failed and killed.
The orchestrator runs the loops (`start`: its background tasks, cancelled by its close) and performs the unloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable

from .admission import Admission
from ..platform.errors import Code, Refused
from .events import EventBus
from .lifecycle import ManagedModel
from .metrics import Metrics
from .reservations import ReservationBook
from ..platform.settings import Settings
from .states import State

log = logging.getLogger("model_orchestrator")

IDLE_STEP_S = 1.0


class Watchdog:
    def __init__(self, settings: Settings, models: dict[str, ManagedModel], reservations: ReservationBook,
                 admission: Admission, events: EventBus, metrics: Metrics, *,
                 unload_idle: Callable[[ManagedModel], Awaitable[object]]):
        self.settings = settings
        self.models = models
        self.reservations = reservations
        self.admission = admission  # its GPU readings
        self.events = events
        self.metrics = metrics
        self._unload_idle = unload_idle
        self._memory_low: set[int] = set()  # GPUs whose free memory is below the margin (memory_low sent once)

    def start(self, run_in_background: Callable[[Awaitable[None]], object]) -> None:
        run_in_background(self._forever("idle", IDLE_STEP_S, self.unload_idle_step))
        run_in_background(self._forever("health", self.settings.health_interval_s, self.check_health))

    async def _forever(self, name: str, interval_s: float, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await step()
            except Exception:
                log.exception("background loop %r: unexpected error (the loop goes on)", name)
                self.metrics.background_errors.labels(name).inc()

    async def unload_idle_step(self) -> None:
        loop = asyncio.get_running_loop()
        for r in self.reservations.expire():
            log.info("reservation %s of %s (%g MB) expired", r.id, r.service, r.vram_mb)
            self.events.publish("reservation", action="expired", reservation=r.to_dict())
        await self._watch_free_memory()
        for model in list(self.models.values()):
            ttl = model.spec.idle_ttl_s
            idle_s = loop.time() - model.last_used_mono
            if ttl and model.state == State.LOADED and not model.in_flight and idle_s >= ttl:
                log.info("unloading %s: idle for %g s", model.id, ttl)
                with contextlib.suppress(Refused):
                    await self._unload_idle(model)

    async def check_health(self) -> None:
        """Ask every loaded llama-server's /health; one that misses health_misses checks in a row (frozen,
        deadlocked: its process is alive but answers nothing) is marked failed and killed, so its requests end with
        an error, its memory returns and the next request loads it again."""
        servers = [(m, m.server) for m in self.models.values() if m.state == State.LOADED and m.server is not None]
        problems = await asyncio.gather(*(server.check_health(self.settings.health_timeout_s)
                                          for _, server in servers))
        for (model, server), problem in zip(servers, problems):
            if problem is None:
                continue
            self.metrics.health_misses.labels(model.id).inc()
            log.warning("%s: %s (%d in a row)", model.id, problem, server.health_misses)
            if server.health_misses >= self.settings.health_misses and model.server is server \
                    and model.state == State.LOADED:
                model._fail({"code": Code.HEALTH_TIMEOUT.value, "message": f"llama-server stopped answering "
                             f"({problem}, {server.health_misses} checks in a row); it was killed",
                             "logs": server.last_logs()})
                await server.stop(0)  # it answers nothing: SIGKILL at once

    async def _watch_free_memory(self) -> None:
        if not self.admission.gpu_view.available:
            return
        margin = self.settings.vram_margin_mb
        for d in (await self.admission.snapshot()).devices:
            if d.free_mb < margin and d.index not in self._memory_low:
                self._memory_low.add(d.index)
                self.events.publish("memory_low", gpu=d.index, free_mb=d.free_mb, total_mb=d.total_mb,
                                    margin_mb=margin, reason="free memory below the margin")
            elif d.free_mb >= margin:
                self._memory_low.discard(d.index)
