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
                        llama_server_argv, reap_leftovers)
from .metrics import Metrics
from .model_files import ModelFilesMissing, resolve
from .registry import GeneratedSource, HfSource, ModelSpec, PathSource, Registry
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
        self.metrics = Metrics(gpu.snapshot, self.owned_pids)
        for slot in self.slots.values():
            self.metrics.set_state(slot.id, slot.state)
        self.http: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task] = set()
        self._idle_task: asyncio.Task | None = None
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

    def owned_pids(self) -> dict[int, str]:
        return {s.server.pid: s.id for s in self.slots.values() if s.server and s.server.pid}

    # ---- load ---------------------------------------------------------------------------------------------
    async def load(self, name: str, *, priority: int | None = None, service: str = "llama-cpp",
                   timeout_s: float | None = None) -> tuple[ModelSlot, str]:
        slot = self.slot(name)
        if service != "llama-cpp":
            raise ApiError(400, "unknown_service", f"service {service!r} is not run by this orchestrator; use 'llama-cpp'")
        if priority is not None:
            slot.priority = priority
        timeout = timeout_s or self.settings.load_timeout_s
        try:
            result = await slot.load(lambda: self._launch_plan(slot.spec), self.http, timeout=timeout,
                                     log_lines=self.settings.log_lines)
        except ModelFilesMissing as exc:
            raise ApiError(409, "model_files_missing", str(exc), model=slot.id) from None
        except LoadFailed as exc:
            raise ApiError(503, exc.code, f"{slot.id} could not be loaded: {exc}", model=slot.id, logs=exc.logs) from None
        except LoadCancelled as exc:
            raise ApiError(409, "load_cancelled", str(exc), model=slot.id) from None
        return slot, result

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

    async def _launch_plan(self, spec: ModelSpec) -> LaunchPlan:
        files = await asyncio.to_thread(resolve, spec, self.settings.state_dir / "models")
        # the OS may hand out a port that a starting instance has not bound yet; no await from here until the
        # slot holds its server, so this set is complete
        taken = {s.server.port for s in self.slots.values() if s.server}
        port = _free_port()
        while port in taken:
            port = _free_port()
        argv = llama_server_argv(self.llama_server_bin, spec, files.model, files.mmproj, port)
        env = {k: v for k, v in os.environ.items() if not k.startswith(_CHILD_ENV_DROP_PREFIXES)}
        env[OWNER_ENV] = self.owner
        env[MODEL_ENV] = spec.id
        return LaunchPlan(argv, env, port)

    # ---- unload -------------------------------------------------------------------------------------------
    async def unload(self, name: str, *, force: bool = False, drain_timeout_s: float = 30.0,
                     reason: str | None = None) -> tuple[ModelSlot, str]:
        slot = self.slot(name)
        try:
            result = await slot.unload(force=force, drain_timeout=drain_timeout_s, stop_timeout=self.settings.stop_timeout_s)
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
    async def snapshot(self) -> GpuSnapshot:
        return await asyncio.to_thread(self.gpu.snapshot)

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
            "vram_mb": vram, "error": slot.last_error,
        }

    async def status(self) -> dict:
        snap = await self.snapshot()
        owned = self.owned_pids()
        gpus = []
        for d in snap.devices:
            procs = [{"pid": p.pid, "used_mb": p.used_mb, "model": owned.get(p.pid)} for p in d.processes]
            foreign = sum(p["used_mb"] or 0 for p in procs if p["model"] is None)
            gpus.append({**{k: v for k, v in d.to_dict().items() if k != "processes"}, "foreign_mb": foreign, "processes": procs})
        loaded = {s.id: self.model_status(s, snap) for s in self.slots.values() if s.state != State.UNLOADED}
        if not snap.available:
            return {"mode": "cpu", "total_mb": None, "used_mb": None, "free_mb": None, "utilization_percent": None,
                    "loaded_models": loaded, "gpus": [], "driver_version": None,
                    "note": f"CPU mode: {snap.error}. Models run on the CPU; no GPU memory is reported."}
        utils = [d.utilization_percent for d in snap.devices if d.utilization_percent is not None]
        return {
            "mode": "gpu",
            "total_mb": sum(d.total_mb for d in snap.devices),
            "used_mb": sum(d.used_mb for d in snap.devices),
            "free_mb": sum(d.free_mb for d in snap.devices),
            "utilization_percent": round(sum(utils) / len(utils), 1) if utils else None,
            "loaded_models": loaded, "gpus": gpus, "driver_version": snap.driver_version, "note": None,
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
