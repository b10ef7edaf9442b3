"""The words for a model's state and for what a load or an unload did: `State`, `LoadResult`, `UnloadResult`.

Owned here, below both their users: the core moves a model between states (lifecycle.TRANSITIONS is the table of
legal moves), the HTTP layer shows them (schemas.py, metrics.py).
"""

from __future__ import annotations

import enum


class State(str, enum.Enum):
    UNLOADED = "unloaded"
    DOWNLOADING = "downloading"  # its files are being fetched (downloads.py); no process, no GPU memory
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


class LoadResult(str, enum.Enum):
    """What a load did (POST /models/load's `result`)."""

    LOADED = "loaded"  # this call started it and it is ready
    JOINED = "joined"  # a load was under way; this call waited for it
    ALREADY_LOADED = "already_loaded"
    LOADING = "loading"  # wait=false: started (or joined) in the background
    QUEUED = "queued"  # wait=false: waiting in the model's queue (its room is held by busy models); loads when due
    DOWNLOADING = "downloading"  # wait=false: its files are being downloaded; the load follows in the background
    RESERVED = "reserved"  # another service's model: its memory is reserved


class UnloadResult(str, enum.Enum):
    """What an unload did (POST /models/unload's `result`)."""

    UNLOADED = "unloaded"
    CANCELLED_LOAD = "cancelled_load"  # it was loading: the load was cancelled and its process stopped
    CANCELLED_DOWNLOAD = "cancelled_download"  # it was downloading: stopped (what arrived is kept, and resumed later)
    JOINED = "joined"  # an unload was under way; this call waited for it
    NOT_LOADED = "not_loaded"  # a registry model that was not loaded: nothing to do
    RELEASED = "released"  # another service's model: its reservation was released
    NOT_HELD = "not_held"  # a name that is neither a registry model nor reserved: nothing to do
