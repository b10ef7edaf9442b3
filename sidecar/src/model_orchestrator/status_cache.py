"""The answers of GET /models/status, /models and /health: built once per state, serialised once, then served as
bytes until something they show changes.

What an answer shows can change through: a model's state, process, requests in flight, priority, last use, error or
LoRA scales (`state_key`); a running download's bytes; the reservation book (its `version`); the GPU readings (a new
snapshot from the sampler, gpu.GpuSampler, told apart by the time it was taken). One answer is kept per route (its
name; never per query string, which the routes do not read: memory stays bounded whatever clients send), with the
key of all of these, compared on every request (a few microseconds), so a change is visible at once. An answer is
also rebuilt after `max_age_s` (the sampling period): values derived from the clock (a reservation's expires_in_s)
are never older than one period.
Concurrent requests for an answer being built wait for that one build instead of building it again.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from .orchestrator import Orchestrator


class StatusCache:
    def __init__(self, orch: Orchestrator, max_age_s: float):
        self.orch = orch
        self.max_age_s = max_age_s
        self._answers: dict[str, tuple[tuple, float, bytes]] = {}  # name -> (key, built at, body)
        self._building: dict[str, tuple[tuple, asyncio.Future]] = {}
        self.builds = 0  # how many answers were built (the benchmark and tests read it)

    def state_key(self) -> tuple:
        o = self.orch
        return (o.gpu_view.latest().taken_at, o.reservations.version, o.dispatcher.version,
                tuple((s.state, s.server, s.in_flight, s.draining, s.priority, s.last_used_mono, id(s.last_error),
                       s.gpu, s.load_seconds, s.lora_version) for s in o.models.values()),
                tuple((m, d.bytes_done) for m, d in o.downloads.active.items()))

    def peek(self, name: str, key: tuple | None = None) -> bytes | None:
        """The cached answer `name` if nothing it shows changed, else None (fast_lane.py asks this first)."""
        hit = self._answers.get(name)
        if hit is not None and hit[0] == (key or self.state_key()) and time.monotonic() - hit[1] < self.max_age_s:
            return hit[2]
        return None

    async def get(self, name: str, build: Callable[[], Awaitable[bytes]]) -> bytes:
        """The cached answer `name` if nothing it shows changed, else `build()`'s (one build at a time per name)."""
        key = self.state_key()
        body = self.peek(name, key)
        if body is not None:
            return body
        now = time.monotonic()  # before the build: clock-derived values are at most max_age_s old when served
        building = self._building.get(name)
        if building is not None and building[0] == key:
            return await asyncio.shield(building[1])
        fut = asyncio.get_running_loop().create_future()
        self._building[name] = (key, fut)
        try:
            body = await build()
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            if self._building.get(name, (None, None))[1] is fut:
                del self._building[name]
        self.builds += 1
        self._answers[name] = (key, now, body)
        fut.set_result(body)
        return body
