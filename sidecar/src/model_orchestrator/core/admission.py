"""Admission: may a load (or a reservation) take GPU memory and a place now, and the evictions that make room.

`scheduler.decide` decides (a pure function of the devices, the residents and the request); `Admission` carries the
decision out. It owns the admission lock (one decision at a time: two loads never count the same free memory; only
its holder starts a load, `Orchestrator.start_load`), the fresh GPU readings a decision takes, the wait for models
that are stopping, the evictions (through the orchestrator's unload), the refusal (`errors.Refused` with what is
missing), and what a decision counts: the placement view (devices, residents), the estimate (estimate.py from the
GGUF headers, with the CUDA overhead of the setting or of calibration.py), its check against NVML after each load
(which teaches calibration), the fit check asked by /models/estimate and before a download, the swap-on-demand rule
(`allow_eviction`) and a reservation's admission (`reserve`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from .calibration import Calibration, EstimateCheck
from ..platform.errors import Code, Refused, shutting_down
from ..files.estimate import Estimate, estimate_headers
from .events import EventBus
from ..platform.gpu import GpuSnapshot, GpuView, NoGpuView
from .lifecycle import ManagedModel, owned_pids
from .metrics import RESERVATION_LABEL, Metrics
from ..files.model_files import HeaderOnHub, read_headers, resolve
from ..platform.outbound import Outbound
from ..files.registry import ModelSpec
from .reservations import DEFAULT_PRIORITY, Reservation, ReservationBook
from ..platform.revision import Revision
from .scheduler import Decision, Device, Request, Resident, available, decide
from ..platform.settings import Settings
from .states import State

log = logging.getLogger("model_orchestrator")

LEAVING_WAIT_S = 10.0  # how long a refusal waits for models that are stopping to exit and return their memory
Evict = Callable[[ManagedModel, bool], Awaitable[object]]  # (victim, force): the orchestrator's unload


class Admission:
    def __init__(self, settings: Settings, models: dict[str, ManagedModel], gpu_view: GpuView | NoGpuView,
                 reservations: ReservationBook, events: EventBus, metrics: Metrics, outbound: Outbound,
                 revision: Revision, *, closing: Callable[[], bool], evict: Evict):
        self.settings = settings
        self.models = models
        self.gpu_view = gpu_view
        self.reservations = reservations
        self.events = events
        self.metrics = metrics
        self.outbound = outbound  # the Hub's header reads of an estimate
        self.revision = revision
        self.lock = asyncio.Lock()
        self.calibration = Calibration(settings.state_dir, metrics.registry)
        self.estimate_checks: dict[str, EstimateCheck] = {}  # model -> its current load's estimate vs NVML
        self._closing = closing
        self._evict = evict

    def allow_eviction(self, spec: ModelSpec, requested: bool | None) -> bool:
        """May a load of `spec` evict idle models of equal priority? The request says, else the model, else the
        global setting (swap on demand, on by default as in every peer)."""
        if requested is not None:
            return requested
        return self.settings.swap_on_demand if spec.swap_on_demand is None else spec.swap_on_demand

    # ---- the decision, carried out ------------------------------------------------------------------------
    async def admit(self, who: str, need_mb: float, priority: int, allow_eviction: bool, force: bool,
                    split: bool = False, is_model: bool = True, report: bool = True) -> Decision:
        """Ask the policy (scheduler.decide), evict what it chose, or raise the refusal. Models that are still
        stopping count until their process has exited; a refusal they cause waits for them first. Hold `lock`."""
        request = Request(who, need_mb, priority, allow_eviction, force, split, is_model)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LEAVING_WAIT_S
        while True:
            devices, residents = await self.placement_view()
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
            await self._evict(self.models[victim], force)  # killed at once: idle (or forced), nothing to drain
        if decision.evict and decision.gpu is not None:
            await self._wait_for_memory(decision.gpu, need_mb)
        return decision

    def refusal(self, who: str, decision: Decision, need_mb: float | None = None, report: bool = True,
                is_model: bool = True) -> Refused:
        """Admission's refusal (counted; `memory_low` published when memory is what is missing)."""
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
            devices, residents = await self.placement_view()
            device = next((d for d in devices if d.index == gpu), None)
            if device is None or available(device, residents, self.settings.vram_margin_mb) >= need_mb:
                return
            await asyncio.sleep(0.01)
        log.warning("GPU %d: memory not yet returned %g s after eviction; loading anyway", gpu, timeout_s)

    async def reserve(self, service: str, vram_mb: float, *, ttl_s: float | None = None, gpu: int = 0,
                      model: str | None = None, priority: int | None = None, allow_eviction: bool = False,
                      force: bool = False) -> Reservation:
        """Admit another service's memory (POST /reservations, or /models/load of a service we do not run)."""
        async with self.lock:
            if self._closing():
                raise shutting_down()
            live = len(self.reservations.active())
            if live >= self.settings.max_reservations:
                raise Refused(Code.TOO_MANY_RESERVATIONS, f"{live} reservations are live, the most there may be "
                              "(MODEL_ORCHESTRATOR_MAX_RESERVATIONS): release or let expire the ones no longer "
                              "needed (GET /reservations lists them)", limit=self.settings.max_reservations)
            await self.admit(f"reservation:{service}", vram_mb, DEFAULT_PRIORITY if priority is None else priority,
                             allow_eviction, force, is_model=False)
            r = self.reservations.add(service, vram_mb, ttl_s=ttl_s or self.settings.reservation_ttl_s, gpu=gpu,
                                      model=model)
            self.events.publish("reservation", action="created", reservation=r.to_dict())
            return r

    # ---- what a decision counts ---------------------------------------------------------------------------
    async def snapshot(self, fresh: bool = False) -> GpuSnapshot:
        """The GPU readings (NVML in a worker thread; CPU mode: a constant, no thread)."""
        if not self.gpu_view.available:
            return self.gpu_view.snapshot(fresh=fresh)
        return await asyncio.to_thread(self.gpu_view.snapshot, fresh=fresh)

    async def placement_view(self) -> tuple[list[Device], list[Resident]]:
        """The devices and residents a decision takes, from fresh readings."""
        return self.placement_from(await self.snapshot(fresh=True))

    def placement_from(self, snap: GpuSnapshot) -> tuple[list[Device], list[Resident]]:
        owned = owned_pids(self.models.values())
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
                                      held_mb_by_gpu=by_gpu, reload_s=m.swap_cost_s))
        return devices, residents

    async def check_fit(self, spec: ModelSpec, est: Estimate, *, priority: int | None = None,
                        allow_eviction: bool | None = None) -> dict:
        """Would a load of `spec` fit now, and what would it evict (the same decision a load takes; nothing done)."""
        model = self.models[spec.id]
        devices, residents = await self.placement_view()
        d = decide(Request(spec.id, est.total_mb, model.priority_for(priority),
                           self.allow_eviction(spec, allow_eviction), split=spec.split),
                   devices, residents, margin_mb=self.settings.vram_margin_mb, max_loaded=self.settings.max_loaded)
        return {"fits": d.admit and not d.evict if devices else None, "fits_after_eviction": d.admit,
                "gpu": d.gpu, "evict": d.evict, "missing_mb": d.missing_mb, "evictable": d.evictable,
                "reason": d.reason, "refusal": d.refusal.value if d.refusal else None}

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

    async def estimate_for_admission(self, spec: ModelSpec) -> Estimate | None:
        """The estimate, or None when the header cannot be read (llama-server then reports the real problem with its
        logs) or the model is not a regular file (a pipe or device: reading it would consume it)."""
        await asyncio.to_thread(resolve, spec, self.settings.generated_dir)  # launching needs the files
        try:
            return await self.estimate(spec)
        except Exception as exc:  # a truncated or foreign file: not ours to diagnose
            log.warning("%s: cannot estimate: %s", spec.id, exc)
            return None

    async def check_estimate(self, model: ManagedModel, timeout_s: float = 5.0) -> None:
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
        self.revision.bump()
        learned = await asyncio.to_thread(self.calibration.record, check, snap.driver_version, est.layers_on_gpu > 0)
        self.events.publish("estimate_checked", model=model.id, **check.to_dict(), learned_overhead_mb=learned)
