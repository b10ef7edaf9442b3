"""One sidecar per state directory.

`serve` takes an exclusive flock on `<state dir>/sidecar.lock` before it touches anything there (generated models,
leftover llama-servers) and holds it for its whole life; the kernel drops it when the process ends, however it ends
(kill -9 included), so there is nothing stale to clean up. The file holds the holder's PID and address, which a
second `serve` prints when it refuses. The descriptor is close-on-exec: llama-server children never inherit it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

LOCK_NAME = "sidecar.lock"


class StateDirBusy(Exception):
    """Another running sidecar holds the state directory."""

    def __init__(self, state_dir: Path, holder: dict):
        self.holder = holder
        super().__init__(
            f"another model-orchestrator (PID {holder.get('pid', '?')}, serving {holder.get('address', '?')}) uses the "
            f"state directory {state_dir}; stop it first, or give this one its own MODEL_ORCHESTRATOR_STATE")


class StateLock:
    def __init__(self, fd: int, path: Path):
        self.fd = fd
        self.path = path

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = -1


def acquire(state_dir: Path, address: str) -> StateLock:
    """Take the state directory for this process, or raise StateDirBusy naming the sidecar that holds it; OSError
    when it cannot be used (not a directory, not writable: a read-only file system, another user's)."""
    if state_dir.exists() and not state_dir.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "it is not a directory", str(state_dir))
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            holder = {}
        os.close(fd)
        raise StateDirBusy(state_dir, holder if isinstance(holder, dict) else {}) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "address": address,
                                  "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode(), 0)
        probe, probe_path = tempfile.mkstemp(dir=state_dir, prefix=".write-check-")  # can we create files here?
        os.close(probe)
        os.unlink(probe_path)
    except OSError:
        os.close(fd)
        raise
    return StateLock(fd, path)
