"""Download on load: a load of a model whose files are missing downloads them first, when it may.

`DownloadOnLoad` owns the rule (MODEL_ORCHESTRATOR_DOWNLOAD_ON_LOAD, else the model's `download_on_load`; only
sources that can be downloaded) and what is checked before anything is written: that the model would fit, now or
after the evictions its load may make (admission.py, from the GGUF header read on the Hub), and, in `plan_pull`,
that the disk can hold the files. It runs before admission, outside its lock (a download must not hold up other
loads). The download itself is downloads.py's (`Downloads`: one per model, progress, joining, cancelling). A load
that may not download is refused with what the Hub's header says it would need (`missing_with_estimate`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from .admission import Admission
from .downloads import Downloads
from ..platform.errors import Code, Refused
from ..platform.errors import HubError
from .lifecycle import ManagedModel
from ..platform.errors import ModelFilesMissing
from ..files.model_files import can_download, plan_pull, pull, resolve
from ..platform.outbound import Outbound
from ..files.registry import HfSource, ModelSpec
from ..platform.settings import Settings
from .states import State

log = logging.getLogger("model_orchestrator")


class DownloadOnLoad:
    def __init__(self, settings: Settings, downloads: Downloads, admission: Admission, outbound: Outbound, *,
                 refuse_if_closing: Callable[[], None]):
        self.settings = settings
        self.downloads = downloads
        self.admission = admission
        self.outbound = outbound
        self._refuse_if_closing = refuse_if_closing

    def enabled(self, spec: ModelSpec) -> bool:
        return self.settings.download_on_load if spec.download_on_load is None else spec.download_on_load

    async def ensure(self, model: ManagedModel, priority: int | None, allow_eviction: bool | None, force: bool,
                     wait: bool) -> bool:
        """The model's files on disk before its load: missing ones are downloaded while the model is `downloading`
        (concurrent loads join), after the fit and disk checks: a refusal costs no download. Returns True when a
        download is under way and wait=False (the caller answers `downloading`)."""
        spec = model.spec
        while True:
            if model.state == State.DOWNLOADING:
                if not wait:
                    return True
                await self.downloads.join(model.id)
                continue
            try:
                await asyncio.to_thread(resolve, spec, self.settings.generated_dir)
                return False
            except ModelFilesMissing as exc:
                if not (can_download(spec) and self.enabled(spec)):
                    raise await self.missing_with_estimate(spec, exc) from None
            if not force:
                await self._refuse_unless_it_could_fit(model, priority, allow_eviction)
            plan = await self.outbound.call(plan_pull, spec)  # HEADs to the Hub, under its deadline
            self._refuse_if_closing()
            if model.state not in (State.UNLOADED, State.FAILED):
                continue  # another load began the download (or finished it) meanwhile: look again
            if not plan.files:  # nothing a source can give: what is missing is a local file (a path adapter)
                await asyncio.to_thread(resolve, spec, self.settings.generated_dir)
                return False
            log.info("%s: downloading %s before loading it", spec.id, ", ".join(plan.files))
            self.downloads.start(model, plan.files, plan.sizes, plan.resumed,
                                 lambda trackers: pull(spec, self.settings.generated_dir, progress=False,
                                                       trackers=trackers, plan=plan))

    async def _refuse_unless_it_could_fit(self, model: ManagedModel, priority: int | None,
                                          allow_eviction: bool | None) -> None:
        """Refuse a download for a model that would not fit even after the evictions its load may make, judged from
        the GGUF header (read on the Hub by range requests for a Hub model). No estimate (a PyPI-carried file is
        not readable before it is fetched; a header that does not parse): no refusal, admission decides later."""
        spec = model.spec
        if not self.admission.gpu_view.available:
            return  # CPU mode: no GPU memory to check
        try:
            est = await self.admission.estimate(spec)
        except HubError:
            raise
        except (ModelFilesMissing, ValueError, OSError) as exc:
            log.info("%s: no estimate before the download (%s); admission decides after it", spec.id, exc)
            return
        fit = await self.admission.check_fit(spec, est, priority=priority, allow_eviction=allow_eviction)
        if not fit["fits_after_eviction"] and (fit["refusal"] or Code.INSUFFICIENT_VRAM) == Code.INSUFFICIENT_VRAM:
            raise Refused(Code.INSUFFICIENT_VRAM, f"{spec.id} would not fit: {fit['reason']}; "
                          + (f"{fit['missing_mb']:.0f} MB missing. " if fit["missing_mb"] else "")
                          + "Nothing was downloaded (the estimate comes from the file's header on the Hub).",
                          model=spec.id, need_mb=round(est.total_mb, 1), missing_mb=fit["missing_mb"], gpu=fit["gpu"],
                          evictable=fit["evictable"])

    async def missing_with_estimate(self, spec: ModelSpec, exc: ModelFilesMissing) -> ModelFilesMissing:
        """A load of a Hub model not downloaded yet is refused; the refusal says, from the header read on the Hub
        (hub.read_remote_header: a few MB), how much GPU memory it would need and whether that fits now, before
        anyone spends a multi-GB download on a model that cannot load."""
        if type(exc) is not ModelFilesMissing or not isinstance(spec.source, HfSource):
            exc.details.setdefault("model", spec.id)
            return exc
        try:
            est = await self.admission.estimate(spec)
            fit = await self.admission.check_fit(spec, est)
        except (ModelFilesMissing, ValueError, OSError) as why:  # hub.HubError: the Hub cannot tell either
            return ModelFilesMissing(f"{exc} (no estimate before the download: {why})", model=spec.id)
        verdict = ("no GPU to check it against" if fit["fits"] is None else "it fits now" if fit["fits"] else
                   f"it fits after evicting {', '.join(fit['evict'])}" if fit["fits_after_eviction"] else
                   f"it does not fit now: {fit['reason']}")
        return ModelFilesMissing(f"{exc}; it needs {est.total_mb:.0f} MB of GPU memory ({verdict})", model=spec.id,
                                 need_mb=round(est.total_mb, 1), fit=fit)
