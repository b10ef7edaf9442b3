"""The answers of the polled read-only routes (GET /models/status, /models, /health): built once per state,
serialised once, then served as bytes until something they show changes.

The cache is handed its builders (path -> the answer's bytes: api.CACHED over views.py) and a key (views.revision: the
orchestrator's revision counter, which every state change bumps, and the GPU readings' time). One answer is kept per
path, never per query string (the routes read none: memory stays bounded whatever clients send); the key is compared on
every request, so a change shows at once. An answer is also rebuilt after `max_age_s` (the sampling period): values
derived from the clock are never older than one period. Concurrent requests for an answer being built wait for that
one build. The fast lane (fast_lane.py) serves the same bytes (`peek`, `get`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Hashable


class StatusCache:
    def __init__(self, builders: dict[str, Callable[[], Awaitable[bytes]]], key: Callable[[], Hashable],
                 max_age_s: float):
        self.builders = builders
        self.key = key
        self.max_age_s = max_age_s
        self._answers: dict[str, tuple[Hashable, float, bytes]] = {}  # path -> (key, built at, body)
        self._building: dict[str, tuple[Hashable, asyncio.Future]] = {}
        self.builds = 0  # how many answers were built (the benchmark and tests read it)

    @property
    def paths(self):
        return self.builders.keys()

    def peek(self, path: str, key: Hashable = None) -> bytes | None:
        """The cached answer of `path` if nothing it shows changed, else None."""
        hit = self._answers.get(path)
        if hit is not None and hit[0] == (key or self.key()) and time.monotonic() - hit[1] < self.max_age_s:
            return hit[2]
        return None

    async def get(self, path: str) -> bytes:
        """The cached answer of `path` if nothing it shows changed, else a new one (one build at a time per path)."""
        key = self.key()
        body = self.peek(path, key)
        if body is not None:
            return body
        now = time.monotonic()  # before the build: clock-derived values are at most max_age_s old when served
        building = self._building.get(path)
        if building is not None and building[0] == key:
            return await asyncio.shield(building[1])
        fut = asyncio.get_running_loop().create_future()
        self._building[path] = (key, fut)
        try:
            body = await self.builders[path]()
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            if self._building.get(path, (None, None))[1] is fut:
                del self._building[path]
        self.builds += 1
        self._answers[path] = (key, now, body)
        fut.set_result(body)
        return body
