"""`Revision`: one counter that every change of what the status views show bumps.

The orchestrator makes one and hands it to everything whose state the views show (each ManagedModel counts every
change of its fields, the reservation book, the queues, the downloads, admission's estimate checks); the status
cache (status_cache.py) keeps an answer while the counter has not moved.
"""

from __future__ import annotations


class Revision:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def bump(self) -> None:
        self.value += 1
