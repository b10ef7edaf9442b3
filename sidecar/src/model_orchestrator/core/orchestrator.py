"""The orchestrator: holds every model (`ManagedModel`) and carries out what happens to them.

It owns the models and their state transitions (`_on_transition`: metrics, events, the dispatcher), starting and
stopping (`start`, `close`: a terminal shutdown flag, background tasks cancelled and awaited), loads (`ensure_loaded`,
the explicit load; `start_load`, the only code that starts a load, under admission's lock), unloads, the launch plan of
a llama-server, the conversations saved across a swap (slot_cache.py) and `lease`, the one call a proxied request
makes for a ready upstream counted in flight. Its parts, each the owner of its rule:

- admission.py `Admission`: whether a load fits now and what it evicts (scheduler.decide decides, Admission carries
  it out), the estimate, reservations' admission;
- dispatcher.py `Dispatcher`: the queue in front of every model and the scheduler's plan (scheduler.plan);
- download_on_load.py `DownloadOnLoad`: a load's missing files, downloaded by downloads.py `Downloads`;
- watchdog.py `Watchdog`: idle unloads, health checks, reservations' expiry, `memory_low`;
- lora.py: adapter scales.
What the HTTP layer shows is built by views.py; which HTTP status a refusal becomes is http_errors.py's. Refusals are
raised as errors.Refused exceptions with a Code; loads return a `LoadOutcome`, unloads an `UnloadOutcome`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Callable

from . import lora
from .admission import Admission
from .dispatcher import Dispatcher, Lease
from .download_on_load import DownloadOnLoad
from .downloads import Downloads
from ..platform.errors import Code, Refused, shutting_down
from .events import EventBus
from ..platform.gpu import GpuView, NoGpuView
# ManagedModel and LlamaServer: HTTP code names them through this module, never through lifecycle
from .lifecycle import (MODEL_ENV, ChildSockets, LaunchPlan, LlamaServer, ManagedModel, ServerFactory, new_api_key,
                        outbound_session, owned_pids, owner_env, placement_env, reap_leftovers)
from ..files.llama_args import API_KEY_ENV, build_argv
from .metrics import Metrics
from ..platform.errors import ModelFilesMissing
from ..files.model_files import resolve
from ..platform.outbound import Outbound
from ..files.registry import ModelSpec, Registry
from .reservations import Reservation, ReservationBook
from ..platform.revision import Revision
from ..platform.settings import Settings
from .slot_cache import SlotCache
from .states import LoadResult, State, UnloadResult
from .watchdog import Watchdog

if TYPE_CHECKING:
    from aiohttp import ClientSession

__all__ = ["LlamaServer", "LoadOutcome", "ManagedModel", "Orchestrator", "UnloadOutcome"]

log = logging.getLogger("model_orchestrator")

# Never handed to llama-server: our secrets, and LLAMA_ARG_* which would override the flags we set (its own key,
# LLAMA_API_KEY, is set per launch).
_CHILD_ENV_DROP_PREFIXES = ("LLAMA_ARG_", "MODEL_ORCHESTRATOR_API_KEY", "HF_TOKEN")


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
        self.revision = Revision()  # bumped by every change of what the status views show (views.py)
        self.models: dict[str, ManagedModel] = {
            s.id: ManagedModel(s, self._on_transition, server_factory, self.revision) for s in registry.models}
        self.reservations = ReservationBook(self.revision)
        self.events = EventBus()  # what happened, for GET /models/events and load callbacks (events.py)
        self.metrics = Metrics(gpu_view.latest, self.owned_pids, self.reservations.active,
                               lambda: {m: d.view() for m, d in self.downloads.active.items()})
        self.metrics.preset([s.id for s in registry.models])
        self.outbound = Outbound(settings.hub_deadline_s)  # the Hub's calls: threads of their own, deadlines
        self.downloads = Downloads(self.events, lambda model, result: self.metrics.downloads.labels(model, result)
                                   .inc(), self.outbound, self.revision)
        self.slot_cache = SlotCache(settings.state_dir / "slots", settings.slot_cache_mb, self.metrics.registry)
        for model in self.models.values():
            self.metrics.set_state(model.id, model.state)
        self.http: ClientSession | None = None  # outbound calls: load callbacks, allowed media URLs (never a child)
        self.sockets = ChildSockets(settings.state_dir)  # where the children listen (LlamaServer.request reaches them)
        self._background: set[asyncio.Task] = set()
        self._closing = False  # terminal: once close() began, no load starts
        self.admission = Admission(settings, self.models, gpu_view, self.reservations, self.events, self.metrics,
                                   self.outbound, self.revision, closing=lambda: self._closing, evict=self._evict)
        self.download_on_load = DownloadOnLoad(settings, self.downloads, self.admission, self.outbound,
                                               refuse_if_closing=self._refuse_if_closing)
        self.watchdog = Watchdog(settings, self.models, self.reservations, self.admission, self.events, self.metrics,
                                 unload_idle=lambda model: self._unload_model(model, reason="idle"))
        self.dispatcher = Dispatcher(self)

    # ---- start and stop -----------------------------------------------------------------------------------
    async def start(self) -> None:
        reaped = await asyncio.to_thread(reap_leftovers, self.owner)
        if reaped:
            log.warning("reaped %d llama-server process(es) left by a previous run: %s", len(reaped), reaped)
        await asyncio.to_thread(self.sockets.open)
        self.http = outbound_session()
        self.watchdog.start(self.run_in_background)

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

    def _refuse_if_closing(self) -> None:
        if self._closing:
            raise shutting_down()

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
        return owned_pids(self.models.values())

    def resolve_files(self, spec: ModelSpec):
        return resolve(spec, self.settings.generated_dir)

    # ---- load ---------------------------------------------------------------------------------------------
    async def ensure_loaded(self, name: str, *, priority: int | None = None, service: str = "llama-cpp",
                            timeout_s: float | None = None, allow_eviction: bool | None = None,
                            force: bool = False, wait: bool = True) -> LoadOutcome:
        """An explicit load (POST /models/load): download the model's missing files first (download_on_load.py),
        join a load under way, or wait in the model's queue like every request (dispatcher.py) until the scheduler
        starts it. `force` skips the queue: admission may kill busy models at once. With wait=False, answer once the
        load is started (`loading`), queued (`queued`) or its download began (`downloading`); a refusal still comes
        back as an error, the outcome shows in status, metrics, events and callbacks."""
        model = self.model(name)
        if service != "llama-cpp":
            raise Refused(Code.UNKNOWN_SERVICE, f"service {service!r} is not run by this orchestrator; use "
                          "'llama-cpp', or pass vram_mb to reserve memory for it (POST /reservations)")
        if model.state != State.LOADED and await self.download_on_load.ensure(model, priority, allow_eviction, force,
                                                                              wait):
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
                                                   allow_eviction=self.admission.allow_eviction(model.spec,
                                                                                                allow_eviction))
        if wait:  # flag: joined a load that something else made the scheduler start
            return LoadOutcome(model, LoadResult.JOINED if flag else LoadResult.LOADED, evicted=evicted)
        return LoadOutcome(model, LoadResult.QUEUED if flag else LoadResult.LOADING)

    async def start_load(self, model: ManagedModel, *, priority: int | None, allow_eviction: bool,
                         timeout_s: float | None, force: bool = False, report_refusal: bool = True) -> list[str] | None:
        """Admit and start a load (the scheduler's effect, or a forced load): under admission's lock, with fresh
        GPU readings, evict what admission chose and begin the load. Returns the evicted models, or None when the
        model was no longer unloaded (another load got there first). Raises the admission's refusal (counted and
        published unless report_refusal is False: the scheduler tries again and refuses for good itself)."""
        timeout = timeout_s or self.settings.load_timeout_s  # llama-server's start only: a download is not counted
        admission = self.admission
        try:
            est = await admission.estimate_for_admission(model.spec)  # before the lock: no header read holds it
            async with admission.lock:
                # only code holding this lock starts a load, so a model found UNLOADED or FAILED here stays out
                # of LOADING until we start it (an unload may only move FAILED to UNLOADED meanwhile)
                self._refuse_if_closing()
                if model.state not in (State.UNLOADED, State.FAILED):
                    return None
                decision = await admission.admit(model.id, est.total_mb if est else 0.0, model.priority_for(priority),
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
            raise await self.download_on_load.missing_with_estimate(model.spec, exc) from None

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
        lora.reset_scales(model)
        argv = build_argv(self.llama_server_bin, spec, files.model, files.mmproj, socket, split, slot_dir,
                          lora=[(path, a.scale) for path, a in zip(files.lora, spec.lora)])
        env = {k: v for k, v in os.environ.items() if not k.startswith(_CHILD_ENV_DROP_PREFIXES)}
        env.update(owner_env(self.owner))
        env[MODEL_ENV] = spec.id
        env[API_KEY_ENV] = key = new_api_key()
        if devices:
            env.update(placement_env(devices))
        return LaunchPlan(argv, env, socket, key)

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
            await self.download_on_load.ensure(model, None, None, False, wait=True)
        async with self.dispatcher.lease(model, timeout_s=timeout_s, gone=gone) as lease:
            yield lease

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

    async def _evict(self, model: ManagedModel, force: bool) -> None:
        """Admission's eviction: an idle (or forced) model is killed at once, its memory returns without
        llama-server's teardown."""
        await self._unload_model(model, force=force, drain_timeout_s=0, reason="evicted", stop_timeout_s=0)

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

    # ---- state changes ------------------------------------------------------------------------------------
    def _on_transition(self, model: ManagedModel, old: State, new: State) -> None:
        if new == State.LOADING:
            self.admission.estimate_checks.pop(model.id, None)  # belonged to the previous process
        self.metrics.set_state(model.id, new)
        if old == State.LOADING and new == State.LOADED:
            self.metrics.loads.labels(model.id, "loaded").inc()
            self.run_in_background(self.admission.check_estimate(model))
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
