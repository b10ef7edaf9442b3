"""Memory that other GPU services (WhisperX, ComfyUI with Wan2.1, Ovi...) declare they hold or are about to take.

A reservation counts in admission from the moment it is made (before the service allocates anything) until it is
released or its TTL runs out; services renew it while they run, so a crashed service's claim expires by itself.
`DEFAULT_PRIORITY` is the priority a reservation has when its request names none (schemas.py, admission.py read it).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable

from ..platform.revision import Revision

DEFAULT_PRIORITY = 50  # models of lower priority may be evicted to make room for a reservation


@dataclass
class Reservation:
    id: str
    service: str
    model: str | None
    vram_mb: float
    gpu: int
    ttl_s: float
    expires_mono: float
    created_at: datetime

    def to_dict(self) -> dict:
        """As the API shows it (schemas.ReservationOut, derived from this class) and events carry it."""
        left = max(0.0, self.expires_mono - time.monotonic())
        return {"id": self.id, "service": self.service, "model": self.model, "vram_mb": self.vram_mb, "gpu": self.gpu,
                "ttl_s": self.ttl_s, "expires_in_s": round(left, 1),
                "expires_at": (datetime.now(timezone.utc) + timedelta(seconds=left)).isoformat(timespec="seconds"),
                "created_at": self.created_at.isoformat(timespec="seconds")}


class ReservationBook:
    def __init__(self, revision: Revision | None = None) -> None:
        self._items: dict[str, Reservation] = {}
        self.revision = revision or Revision()  # bumped by every change (what status shows)

    def add(self, service: str, vram_mb: float, *, ttl_s: float, gpu: int = 0, model: str | None = None) -> Reservation:
        r = Reservation(uuid.uuid4().hex[:12], service, model, vram_mb, gpu, ttl_s, time.monotonic() + ttl_s,
                        datetime.now(timezone.utc))
        self._items[r.id] = r
        self.revision.bump()
        return r

    def get(self, rid: str) -> Reservation | None:
        self.expire()
        return self._items.get(rid)

    def renew(self, rid: str, ttl_s: float | None = None) -> Reservation | None:
        r = self.get(rid)
        if r is not None:
            r.ttl_s = ttl_s or r.ttl_s
            r.expires_mono = time.monotonic() + r.ttl_s
            self.revision.bump()
        return r

    def release(self, rid: str) -> Reservation | None:
        self.expire()
        r = self._items.pop(rid, None)
        if r is not None:
            self.revision.bump()
        return r

    def release_matching(self, name: str) -> list[Reservation]:
        """The guide's `/models/unload {model: "wan2.1-14b"}`: drop the claims made under that model or service name."""
        self.expire()
        return self._drop(lambda r: name in (r.model, r.service))

    def expire(self) -> list[Reservation]:
        now = time.monotonic()
        return self._drop(lambda r: r.expires_mono <= now)

    def _drop(self, which: Callable[[Reservation], bool]) -> list[Reservation]:
        gone = [r for r in self._items.values() if which(r)]
        for r in gone:
            del self._items[r.id]
        if gone:
            self.revision.bump()
        return gone

    def active(self) -> list[Reservation]:
        self.expire()
        return list(self._items.values())

    def reserved_mb(self, gpu: int) -> float:
        return sum(r.vram_mb for r in self.active() if r.gpu == gpu)
