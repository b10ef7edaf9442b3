"""The orchestrator: the one place that holds the state of every model, and the operations on it.

Handlers in api.py and proxy.py call these methods; they never touch processes themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path

import aiohttp

from . import __version__
from .errors import ApiError
from .gpu import GpuSnapshot, GpuView, NoGpuView
from .lifecycle import (MODEL_ENV, OWNER_ENV, LaunchPlan, LoadCancelled, LoadFailed, ModelBusy, ModelSlot, State,
                        join_load, llama_server_argv, placement_env, reap_leftovers)
from .estimate import Estimate, estimate_file
from .metrics import Metrics
from .model_files import ModelFiles, ModelFilesMissing, resolve
from .registry import GeneratedSource, HfSource, ModelSpec, PathSource, Registry
from .reservations import ReservationBook
from .scheduler import Decision, Device, Request, Resident, available, decide
from .settings import Settings

log = logging.getLogger("model_orchestrator")

# Never handed to llama-server: our secrets, and LLAMA_ARG_* which would override the flags we set.
_CHILD_ENV_DROP_PREFIXES = ("LLAMA_ARG_", "MODEL_ORCHESTRATOR_API_KEY", "HF_TOKEN")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orchestrator:
    def __init__(self, settings: Settings, registry: Registry, gpu: GpuView | NoGpuView, llama_server_bin: Path):
        self.settings = settings
        self.registry = registry
        self.gpu = gpu
        self.llama_server_bin = llama_server_bin
        self.slots: dict[str, ModelSlot] = {s.id: ModelSlot(s, self._on_transition) for s in registry.models}
        self.reservations = ReservationBook()
        self.metrics = Metrics(gpu.latest, self.owned_pids, self.reservations.active)
        self.metrics.preset([s.id for s in registry.models])
        for slot in self.slots.values():
            self.metrics.set_state(slot.id, slot.state)
        self.http: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task] = set()
        self._idle_task: asyncio.Task | None = None
        self._admission = asyncio.Lock()  # one decision at a time: two loads never both take the same free memory
        self.reaped: list[int] = []

    # ---- start and stop -----------------------------------------------------------------------------------
    async def start(self) -> None:
        self.reaped = await asyncio.to_thread(reap_leftovers, self.owner)
        if self.reaped:
            log.warning("reaped %d llama-server process(es) left by a previous run: %s", len(self.reaped), self.reaped)
        # no connection cap: concurrency is bounded per model by llama-server's slots, not by our pool
        # keepalive_timeout below llama-server's own (5 s) so we rarely reuse a connection it is closing
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4),
                                          auto_decompress=False)
        self._idle_task = asyncio.create_task(self._unload_idle_models())

    async def close(self) -> None:
        if self._idle_task:
            self._idle_task.cancel()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*(s.unload(force=True, drain_timeout=0, stop_timeout=self.settings.stop_timeout_s)
                               for s in self.slots.values()), return_exceptions=True)
        if self.http:
            await self.http.close()

    @property
    def owner(self) -> str:
        return str(self.settings.state_dir.resolve())

    # ---- lookups ------------------------------------------------------------------------------------------
    def slot(self, name: str | None) -> ModelSlot:
        spec = self.registry.lookup(name) if name else self.registry.default
        if spec is None:
            known = ", ".join(sorted(self.slots))
            raise ApiError(404, "model_not_found", f"unknown model {name!r}; known models: {known} (GET /models)")
        return self.slots[spec.id]

    def queue_limit(self, slot: ModelSlot) -> int:
        """The most proxied requests one model may hold at once (waiting for a load, queued or running in
        llama-server): MODEL_ORCHESTRATOR_MAX_QUEUE on top of llama-server's parallel slots; 0 means no cap."""
        if not self.settings.max_queue:
            return 0
        return self.settings.max_queue + _parallel_slots(slot.spec.extra_args)

    def owned_pids(self) -> dict[int, str]:
        return {s.server.pid: s.id for s in self.slots.values() if s.server and s.server.pid}

    # ---- load ---------------------------------------------------------------------------------------------
    async def load(self, name: str, *, priority: int | None = None, service: str = "llama-cpp",
                   timeout_s: float | None = None, allow_eviction: bool = False, force: bool = False) -> tuple[ModelSlot, str]:
        slot = self.slot(name)
        if service != "llama-cpp":
            raise ApiError(400, "unknown_service", f"service {service!r} is not run by this orchestrator; use 'llama-cpp', "
                           "or pass vram_mb to reserve memory for it (POST /reservations)")
        timeout = timeout_s or self.settings.load_timeout_s
        launch = lambda: self._launch_plan(slot)  # noqa: E731
        try:
            while True:
                # an unload under way finishes first; the load after it is admitted like any other (never started
                # behind admission's back, which could overcommit memory)
                await slot.wait_unloaded()
                if slot.state in (State.LOADED, State.LOADING):  # already admitted: join (no await before it)
                    result = await slot.load(launch, self.http, timeout=timeout, log_lines=self.settings.log_lines)
                    return slot, result
                await self._admission.acquire()
                if slot.state != State.UNLOADING:  # an unload may have begun while we waited for the lock
                    break
                self._admission.release()
            try:
                if slot.state not in (State.LOADED, State.LOADING):
                    if priority is not None:
                        slot.priority = priority
                    est = await self._estimate_for_admission(slot.spec)
                    decision = await self._admit(slot.id, est.total_mb if est else 0.0, slot.priority, allow_eviction,
                                                 force, slot.spec.split)
                    slot.estimate, slot.gpu, slot.split = est, decision.gpu, decision.split
                    task = slot.start_load(launch, self.http, timeout=timeout, log_lines=self.settings.log_lines)
                    joined = False
                else:
                    task, joined = slot._load_task, True
            finally:
                self._admission.release()
            await join_load(task, slot.id)
            return slot, "joined" if joined else "loaded"
        except ModelFilesMissing as exc:
            raise ApiError(409, "model_files_missing", str(exc), model=slot.id) from None
        except LoadFailed as exc:
            raise ApiError(503, exc.code, f"{slot.id} could not be loaded: {exc}", model=slot.id, logs=exc.logs) from None
        except LoadCancelled as exc:
            raise ApiError(409, "load_cancelled", str(exc), model=slot.id) from None

    async def _admit(self, who: str, need_mb: float, priority: int, allow_eviction: bool, force: bool,
                     split: bool = False) -> Decision:
        """Ask the policy (scheduler.decide), evict what it chose, or refuse with what is missing. Call under the lock."""
        devices, residents = await self._placement_view()
        decision = decide(Request(who, need_mb, priority, allow_eviction, force, split), devices, residents,
                          margin_mb=self.settings.vram_margin_mb, max_loaded=self.settings.max_loaded)
        if not decision.admit:
            self.metrics.admission_refusals.labels(who).inc()
            raise ApiError(409, "insufficient_vram", f"{who} does not fit: {decision.reason}; "
                           + (f"{decision.missing_mb:.0f} MB missing. " if decision.missing_mb else "")
                           + (f"Could be evicted: {', '.join(decision.evictable)} (pass allow_eviction=true)."
                              if decision.evictable else "Nothing may be evicted for it."),
                           model=who, missing_mb=decision.missing_mb, need_mb=round(need_mb, 1), gpu=decision.gpu,
                           evictable=decision.evictable)
        for victim in decision.evict:
            log.info("evicting %s to make room for %s (%s)", victim, who, decision.reason)
            # an evicted model is idle (or forced): killed at once, its memory returns without llama-server's teardown
            await self.unload(victim, force=force, drain_timeout_s=0, reason="evicted", stop_timeout_s=0)
        if decision.evict and decision.gpu is not None:
            await self._wait_for_memory(decision.gpu, need_mb)
        return decision

    async def _wait_for_memory(self, gpu: int, need_mb: float, timeout_s: float = 5.0) -> None:
        """After an eviction the driver may take a moment to return the memory (a dying process shows as foreign):
        wait until it is available rather than start a load into an out-of-memory error."""
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
        return self._placement_from(await self.snapshot(fresh=True))

    def _placement_from(self, snap: GpuSnapshot) -> tuple[list[Device], list[Resident]]:
        owned = self.owned_pids()
        devices = [Device(d.index, d.total_mb,
                          foreign_mb=sum(p.used_mb or 0 for p in d.processes if p.pid not in owned),
                          reserved_mb=self.reservations.reserved_mb(d.index)) for d in snap.devices]
        residents = []
        for s in self.slots.values():
            if s.state not in (State.LOADING, State.LOADED):
                continue
            measured = snap.process_mb(s.server.pid) if (s.server and s.server.pid) else {}
            est = s.estimate.total_mb if s.estimate else 0.0
            if s.split:
                by_gpu = {g: max(mb, measured.get(g, 0)) for g, mb in s.split.items()}
            else:
                by_gpu = {s.gpu: max(est, sum(measured.values()))} if s.gpu is not None else {}
            residents.append(Resident(s.id, s.gpu, sum(by_gpu.values()), s.priority, s.in_flight, s.last_used_mono,
                                      loading=s.state == State.LOADING, held_mb_by_gpu=by_gpu))
        return devices, residents

    async def estimate(self, spec: ModelSpec, *, context_size: int | None = None, cache_type: str | None = None,
                       n_gpu_layers: int | None = None) -> Estimate:
        """GPU memory of `spec`'s llama-server, from its GGUF header (files must be on disk)."""
        files: ModelFiles = await asyncio.to_thread(resolve, spec, self.settings.state_dir / "models")
        return await asyncio.to_thread(
            estimate_file, files.model, mmproj=files.mmproj, n_ctx=context_size or spec.context_size,
            n_gpu_layers=spec.n_gpu_layers if n_gpu_layers is None else n_gpu_layers,
            cache_type=cache_type or spec.cache_type, flash_attn=spec.flash_attn != "off",
            extra_args=spec.extra_args, overhead_mib=self.settings.cuda_overhead_mb)

    async def _estimate_for_admission(self, spec: ModelSpec) -> Estimate | None:
        """The estimate, or None when the header cannot be read (llama-server then reports the real problem with its
        logs) or the model is not a regular file (a pipe or device: reading it would consume it)."""
        files = await asyncio.to_thread(resolve, spec, self.settings.state_dir / "models")
        if not files.model.is_file():
            return None
        try:
            return await self.estimate(spec)
        except ModelFilesMissing:
            raise
        except Exception as exc:  # a truncated or foreign file: not ours to diagnose
            log.warning("%s: cannot estimate from %s: %s", spec.id, files.model, exc)
            return None

    async def check_fit(self, spec: ModelSpec, est: Estimate) -> dict:
        """Would it fit now, and what could make room (no eviction is done)."""
        slot = self.slots[spec.id]
        devices, residents = await self._placement_view()
        d = decide(Request(spec.id, est.total_mb, slot.priority, allow_eviction=False, split=spec.split), devices,
                   residents, margin_mb=self.settings.vram_margin_mb, max_loaded=self.settings.max_loaded)
        return {"fits": d.admit and not d.evict if devices else None, "fits_after_eviction": d.admit,
                "gpu": d.gpu, "evict": d.evict, "missing_mb": d.missing_mb, "evictable": d.evictable,
                "reason": d.reason}

    # ---- reservations -------------------------------------------------------------------------------------
    async def reserve(self, service: str, vram_mb: float, *, ttl_s: float | None = None, gpu: int = 0,
                      model: str | None = None, priority: int = 50, allow_eviction: bool = False, force: bool = False):
        async with self._admission:
            await self._admit(f"reservation:{service}", vram_mb, priority, allow_eviction, force)
            return self.reservations.add(service, vram_mb, ttl_s=ttl_s or self.settings.reservation_ttl_s, gpu=gpu,
                                         model=model)

    def load_in_background(self, name: str, **kwargs) -> ModelSlot:
        """POST /models/load with wait=false: start (or join) the load, answer at once."""
        slot = self.slot(name)

        async def run() -> None:
            with contextlib.suppress(ApiError):  # the outcome is visible in status and metrics
                await self.load(name, **kwargs)

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return slot

    async def _launch_plan(self, slot: ModelSlot) -> LaunchPlan:
        spec = slot.spec
        files = await asyncio.to_thread(resolve, spec, self.settings.state_dir / "models")
        # the OS may hand out a port that a starting instance has not bound yet; no await from here until the
        # slot holds its server, so this set is complete
        taken = {s.server.port for s in self.slots.values() if s.server}
        port = _free_port()
        while port in taken:
            port = _free_port()
        devices, split = [], None
        if self.gpu.available and len(self.gpu.snapshot().devices) > 1:  # one GPU: nothing to choose
            if slot.split:
                devices, split = sorted(slot.split), [slot.split[i] for i in sorted(slot.split)]
            elif slot.gpu is not None:
                devices = [slot.gpu]
        argv = llama_server_argv(self.llama_server_bin, spec, files.model, files.mmproj, port, split)
        env = {k: v for k, v in os.environ.items() if not k.startswith(_CHILD_ENV_DROP_PREFIXES)}
        env[OWNER_ENV] = self.owner
        env[MODEL_ENV] = spec.id
        if devices:
            env.update(placement_env(devices))
        return LaunchPlan(argv, env, port)

    # ---- unload -------------------------------------------------------------------------------------------
    async def unload(self, name: str, *, force: bool = False, drain_timeout_s: float = 30.0,
                     reason: str | None = None, stop_timeout_s: float | None = None) -> tuple[ModelSlot, str]:
        slot = self.slot(name)
        stop_timeout = self.settings.stop_timeout_s if stop_timeout_s is None else stop_timeout_s
        try:
            result = await slot.unload(force=force, drain_timeout=drain_timeout_s, stop_timeout=stop_timeout)
        except ModelBusy as exc:
            raise ApiError(409, "model_busy", f"{slot.id}: {exc}; nothing was changed. Retry later, raise drain_timeout_s, "
                           "or pass force=true to end them", model=slot.id, in_flight=exc.in_flight) from None
        if result in ("unloaded", "cancelled_load"):
            self.metrics.unloads.labels(slot.id, reason or ("force" if force else "request")).inc()
        return slot, result

    async def _unload_idle_models(self) -> None:
        """Idle TTL: a model unused for idle_ttl_s seconds is unloaded (never one with requests in flight)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            for r in self.reservations.expire():
                log.info("reservation %s of %s (%g MB) expired", r.id, r.service, r.vram_mb)
            for slot in self.slots.values():
                ttl = slot.spec.idle_ttl_s
                if ttl and slot.state == State.LOADED and not slot.in_flight and loop.time() - slot.last_used_mono >= ttl:
                    log.info("unloading %s: idle for %g s", slot.id, ttl)
                    with contextlib.suppress(ApiError):
                        await self.unload(slot.id, reason="idle")

    # ---- requests -----------------------------------------------------------------------------------------
    async def ready_server(self, slot: ModelSlot):
        """The running llama-server for a proxied request: loads on demand, waits for a load under way."""
        if slot.state == State.LOADED and slot.server is not None:
            if slot.draining:
                raise ApiError(503, "model_draining", f"{slot.id} is being unloaded; retry in a moment",
                               headers={"Retry-After": "1"}, model=slot.id)
            return slot.server
        if slot.state == State.UNLOADING:
            raise ApiError(503, "model_unloading", f"{slot.id} is being unloaded; retry in a moment",
                           headers={"Retry-After": "1"}, model=slot.id)
        if slot.state != State.LOADING and not slot.spec.load_on_demand:
            raise ApiError(409, "model_not_loaded", f"{slot.id} is not loaded and loads only on request: "
                           "POST /models/load first", model=slot.id)
        self.metrics.waiting.labels(slot.id).inc()
        try:
            await self.load(slot.id)
        finally:
            self.metrics.waiting.labels(slot.id).dec()
        if slot.server is None:  # unloaded again between the load and now
            raise ApiError(503, "model_unloading", f"{slot.id} was unloaded while the request waited",
                           headers={"Retry-After": "1"}, model=slot.id)
        return slot.server

    # ---- state changes ------------------------------------------------------------------------------------
    def _on_transition(self, slot: ModelSlot, old: State, new: State) -> None:
        self.metrics.set_state(slot.id, new)
        if old == State.LOADING and new == State.LOADED:
            self.metrics.loads.labels(slot.id, "loaded").inc()
            if slot.load_seconds is not None:
                self.metrics.load_duration.labels(slot.id).observe(slot.load_seconds)
        elif new == State.FAILED:
            code = (slot.last_error or {}).get("code", "unknown")
            self.metrics.failures.labels(slot.id, code).inc()
            if old == State.LOADING:
                self.metrics.loads.labels(slot.id, "failed").inc()
        elif old == State.LOADING and new == State.UNLOADING:
            self.metrics.loads.labels(slot.id, "cancelled").inc()
        log.info("%s: %s -> %s", slot.id, old.value, new.value)

    # ---- views --------------------------------------------------------------------------------------------
    async def snapshot(self, fresh: bool = False) -> GpuSnapshot:
        return await asyncio.to_thread(self.gpu.snapshot, fresh=fresh)

    def model_status(self, slot: ModelSlot, snap: GpuSnapshot) -> dict:
        server = slot.server
        vram = sum(snap.process_mb(server.pid).values()) if (server and server.pid and snap.available) else None
        return {
            "model": slot.id, "service": slot.service,
            "loaded_at": slot.loaded_at.isoformat(timespec="seconds") if slot.loaded_at else None,
            "status": slot.state, "pid": server.pid if server else None, "port": server.port if server else None,
            "priority": slot.priority, "context_size": slot.spec.context_size, "in_flight": slot.in_flight,
            "draining": slot.draining, "last_used": slot.last_used.isoformat(timespec="seconds") if slot.last_used else None,
            "load_seconds": round(slot.load_seconds, 4) if slot.load_seconds is not None else None,
            "vram_mb": vram, "estimate_mb": round(slot.estimate.total_mb, 1) if slot.estimate else None,
            "gpu": slot.gpu, "error": slot.last_error,
        }

    async def status(self) -> dict:
        return self.status_view(await self.snapshot())

    def status_view(self, snap: GpuSnapshot) -> dict:
        """GET /models/status from a given GPU snapshot (the sampler's: no NVML call on the request's path)."""
        owned = self.owned_pids()
        devices, residents = self._placement_from(snap)
        room = {d.index: round(available(d, residents, self.settings.vram_margin_mb), 1) for d in devices}
        gpus = []
        for d in snap.devices:
            procs = [{"pid": p.pid, "used_mb": p.used_mb, "model": owned.get(p.pid)} for p in d.processes]
            foreign = sum(p["used_mb"] or 0 for p in procs if p["model"] is None)
            gpus.append({**{k: v for k, v in d.to_dict().items() if k != "processes"}, "foreign_mb": foreign,
                         "reserved_mb": self.reservations.reserved_mb(d.index), "available_mb": room.get(d.index, 0.0),
                         "processes": procs})
        loaded = {s.id: self.model_status(s, snap) for s in self.slots.values() if s.state != State.UNLOADED}
        reservations = [r.to_dict() for r in self.reservations.active()]
        if not snap.available:
            return {"mode": "cpu", "total_mb": None, "used_mb": None, "free_mb": None, "utilization_percent": None,
                    "loaded_models": loaded, "gpus": [], "reservations": reservations, "driver_version": None,
                    "note": f"CPU mode: {snap.error}. Models run on the CPU; no GPU memory is reported."}
        utils = [d.utilization_percent for d in snap.devices if d.utilization_percent is not None]
        return {
            "mode": "gpu",
            "total_mb": sum(d.total_mb for d in snap.devices),
            "used_mb": sum(d.used_mb for d in snap.devices),
            "free_mb": sum(d.free_mb for d in snap.devices),
            "utilization_percent": round(sum(utils) / len(utils), 1) if utils else None,
            "loaded_models": loaded, "gpus": gpus, "reservations": reservations, "driver_version": snap.driver_version,
            "note": None,
        }

    def models(self) -> dict:
        out = []
        for spec in self.registry.models:
            slot = self.slots[spec.id]
            out.append({
                "id": spec.id, "name": spec.name or spec.id, "aliases": spec.aliases, "status": slot.state,
                "source": spec.source.type, "files_present": _files_present(spec, self.settings.state_dir / "models"),
                "context_size": spec.context_size, "n_gpu_layers": spec.n_gpu_layers, "cache_type": spec.cache_type,
                "priority": slot.priority, "idle_ttl_s": spec.idle_ttl_s, "load_on_demand": spec.load_on_demand,
                "vision": bool(getattr(spec.source, "mmproj", None)), "default": spec.id == self.registry.default.id,
            })
        return {"default_model": self.registry.default.id, "models": out}

    def health(self) -> dict:
        return {"status": "ok", "version": __version__, "mode": "gpu" if self.gpu.available else "cpu",
                "llama_server": str(self.llama_server_bin),
                "models_loaded": sum(1 for s in self.slots.values() if s.state == State.LOADED)}


def _parallel_slots(extra_args: list[str]) -> int:
    """llama-server's -np/--parallel from the model's extra_args; its default (auto) is 4 slots."""
    for i, arg in enumerate(extra_args):
        value = None
        if arg in ("-np", "--parallel") and i + 1 < len(extra_args):
            value = extra_args[i + 1]
        elif arg.startswith("--parallel="):
            value = arg.split("=", 1)[1]
        if value is not None:
            with contextlib.suppress(ValueError):
                if int(value) > 0:
                    return int(value)
    return 4


def _files_present(spec: ModelSpec, generated_dir: Path) -> bool:
    src = spec.source
    if isinstance(src, GeneratedSource):
        return True  # generated on first load in well under a second
    if isinstance(src, PathSource):
        return src.path.exists() and (src.mmproj is None or src.mmproj.exists())
    assert isinstance(src, HfSource)
    try:
        resolve(spec, generated_dir)
        return True
    except ModelFilesMissing:
        return False
