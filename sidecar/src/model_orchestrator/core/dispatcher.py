"""The queue in front of every model, and the one owner that carries out what the queue policy plans.

A proxied request gets its model's llama-server through `lease` (Orchestrator.lease): at once when its model is
loaded and nobody waits anywhere, else as a ticket in the model's queue until the policy grants it. An explicit load
(`load`) waits as a load-only ticket, granted once its model is loaded. The policy is `scheduler.plan`, a pure
function; this module holds the tickets and their futures, builds the policy's view, and performs the plan: grants
(a request is counted in flight before its caller wakes, so its model cannot be evicted in between), refusals and
expiries (`errors.Refused`), the end of a model's turn (it drains: `ManagedModel.draining`), loads (through
`Orchestrator.start_load`, which admits with fresh GPU readings and evicts under the admission lock), and reading the
next model's file into the page cache while its victims drain. It plans after every event that can change the
answer: a ticket, a release, a state change, a timer (a deadline, a turn's end).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Protocol

from .admission import Admission
from ..platform import page_cache
from ..platform.errors import Code, Refused, shutting_down
from .events import EventBus
from .lifecycle import LlamaServer, LoadFailed, LoadCancelled, ManagedModel, State
from ..files.llama_args import parallel_slots
from .metrics import Metrics
from ..files.registry import ModelSpec
from ..platform.revision import Revision
from .scheduler import Limits, ModelView, Plan, Resident, Ticket, plan
from ..platform.settings import Settings

log = logging.getLogger("model_orchestrator.dispatcher")

GONE_POLL_S = 0.5  # how often a queued request looks whether its caller hung up
RETRY_START_S = 0.5  # a load the fresh readings refused (memory moved since the plan) is tried again after this
_LEARN = 0.3  # weight of the newest swap in the learned swap cost


class CallerGone(Exception):
    """The caller of a queued request hung up: it left the queue; nothing to answer."""


@dataclass(eq=False)
class _Waiter:
    ticket: Ticket
    future: asyncio.Future  # result: None once granted; exception: the Refused that ends its wait
    allow_eviction: bool
    start_timeout_s: float | None = None  # an explicit load's timeout for llama-server's start
    evicted: tuple[str, ...] = ()  # an explicit load's: what the load that served it evicted
    joined: bool = True  # an explicit load's: False when it is the one that made the scheduler start the load


@dataclass(frozen=True)
class Lease:
    """A granted request: the llama-server to send it to, and how long it waited in the queue."""

    server: LlamaServer
    waited_s: float


class Owner(Protocol):
    """What the dispatcher needs of its owner (orchestrator.Orchestrator): the models and their parts, and the one
    call that starts a load."""

    settings: Settings
    models: dict[str, ManagedModel]
    admission: Admission
    metrics: Metrics
    events: EventBus
    revision: Revision
    closing: bool

    def start_load(self, model: ManagedModel, *, priority: int | None, allow_eviction: bool, timeout_s: float | None,
                   report_refusal: bool = True) -> Awaitable[list[str] | None]: ...

    def resolve_files(self, spec: ModelSpec): ...


class Dispatcher:
    def __init__(self, orch: Owner):
        self.orch = orch
        self.settings = orch.settings
        self._queues: dict[str, dict[int, _Waiter]] = {m: {} for m in orch.models}  # insertion = arrival order
        self._slots = {m.id: parallel_slots(m.spec.extra_args) for m in orch.models.values()}
        self._waiting = 0  # tickets in all queues
        self._ids = itertools.count(1)
        self._closed: set[str] = set()  # loaded models whose turn is over (the last plan's `close`)
        self._starting: set[str] = set()  # loads a task of ours is starting, not yet LOADING
        self._victims: dict[str, set[str]] = {}  # a starting load -> the idle models it evicts: nothing enters them
        self._retry_at: dict[str, float] = {}  # model -> when a refused start may be tried again
        self._loaded_at: dict[str, float] = {}
        self._turn_grants: dict[str, int] = {}
        self._learned: set[str] = set()  # models whose swap cost was learned (else it is the policy's prior)
        self._idle_since: dict[str, float] = {}  # loaded model -> when its last request in flight ended
        self._estimating: dict[str, bool] = {}  # model -> True while its estimate is read, False when it failed
        self._started: dict[str, asyncio.Future] = {}  # model -> done once its start was admitted (or refused)
        self._prefetched: str | None = None
        self._planning: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self._prefetch_pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")

    # ---- what callers use ---------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lease(self, model: ManagedModel, *, timeout_s: float | None = None,
                    gone: Callable[[], bool] | None = None) -> AsyncIterator[Lease]:
        """The model's llama-server for one request, counted in flight until the block ends. Waits in the model's
        queue when it cannot go at once; raises Refused (queue_full, queue_timeout, a load's failure, a model that
        can never fit) or CallerGone (`gone()` turned true while it waited)."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while True:
            if self._may_enter(model):
                self._grant(model)
            else:
                await self._wait(model, timeout_s=timeout_s, gone=gone, arrived=t0)
            server = model.server
            if model.state == State.LOADED and server is not None:
                break
            model.release()  # unloaded or crashed between the grant and now: wait for its next load
        waited = loop.time() - t0
        metrics = self.orch.metrics
        metrics.child(metrics.queue_wait, model.id).observe(waited)
        in_flight = metrics.child(metrics.in_flight, model.id)
        in_flight.inc()
        try:
            yield Lease(server, waited)
        finally:
            in_flight.dec()
            model.release()
            if model.in_flight == 0:
                self._idle_since[model.id] = loop.time()
            if self._queues[model.id] or (model.in_flight == 0 and (self._waiting or model.id in self._closed)):
                self.wake()

    async def load(self, model: ManagedModel, *, priority: int | None, allow_eviction: bool,
                   timeout_s: float | None, wait: bool) -> tuple[bool, list[str]]:
        """An explicit load through the queue. wait=True: once loaded, (joined: a load it did not start served it,
        what that load evicted). wait=False: once the load is started, or refused, or queued: (still queued, []);
        the ticket waits on in the background."""
        waiter = self._enqueue(model, load_only=True, priority=priority, allow_eviction=allow_eviction,
                               start_timeout_s=timeout_s, arrived=asyncio.get_running_loop().time())
        self.plan_now()
        if not wait:
            if model.id in self._started:  # the plan starts it: answer once it is admitted and started, or refused
                await asyncio.shield(self._started[model.id])
            if waiter.future.done():
                waiter.future.result()  # a refusal (never fits, its load failed at once) is the answer
            waiter.future.add_done_callback(lambda f: f.cancelled() or f.exception())
            queued = model.id not in self._starting and model.state != State.LOADING and not waiter.future.done()
            return queued, []
        try:
            await waiter.future
        except BaseException:
            self._drop(waiter)
            raise
        return waiter.joined, list(waiter.evicted)

    def queue_views(self) -> dict[str, dict]:
        return {m: self.queue_view(m) for m in self._queues}

    def queue_view(self, model_id: str) -> dict:
        """Its queue for status: length and how long the oldest has waited."""
        queue = self._queues.get(model_id)
        if not queue:
            return {"length": 0, "oldest_wait_s": None}
        oldest = next(iter(queue.values())).ticket.arrived
        return {"length": len(queue), "oldest_wait_s": round(asyncio.get_running_loop().time() - oldest, 3)}

    def close(self) -> None:
        """Shutdown: every waiting request is refused; no load starts from here on."""
        for queue in self._queues.values():
            for w in list(queue.values()):
                self._finish(w, shutting_down())
        for task in self._tasks:
            task.cancel()
        if self._timer:
            self._timer.cancel()
        self._prefetch_pool.shutdown(wait=False, cancel_futures=True)

    # ---- events -------------------------------------------------------------------------------------------
    def on_transition(self, model: ManagedModel, old: State, new: State) -> None:
        loop = asyncio.get_running_loop()
        if new == State.LOADED:
            self._loaded_at[model.id] = loop.time()
            self._turn_grants[model.id] = 0
        elif old == State.LOADED:
            self._loaded_at.pop(model.id, None)
            self._idle_since.pop(model.id, None)
            self._closed.discard(model.id)
        if old == State.LOADING and new in (State.FAILED, State.UNLOADING):
            self._fail_all(model, self._load_error(model, new))  # before any plan could start it again
        if new in (State.UNLOADED, State.FAILED) and not model.spec.load_on_demand:
            for w in [w for w in self._queues[model.id].values() if not w.ticket.load_only]:
                self._finish(w, Refused(Code.MODEL_NOT_LOADED, f"{model.id} was unloaded while the request waited, "
                                        "and it loads only on request: POST /models/load first", model=model.id))
        if self._waiting or new in (State.UNLOADED, State.FAILED):
            self.wake()

    def _fail_all(self, model: ManagedModel, error: Refused) -> None:
        for w in list(self._queues[model.id].values()):
            self._finish(w, error)

    @staticmethod
    def _load_error(model: ManagedModel, new: State) -> Refused:
        """What the requests that waited for a load hear: its failure (code and logs), or the unload that cancelled
        it."""
        if new == State.UNLOADING:
            return LoadCancelled(f"load of {model.id} was cancelled by an unload", model=model.id)
        err = model.last_error or {}
        try:
            code = Code(err.get("code"))
        except ValueError:
            code = Code.LOAD_FAILED
        failed = LoadFailed(err.get("message") or f"{model.id} failed to load", err.get("logs"), code=code)
        failed.details["model"] = model.id
        return failed

    def wake(self) -> None:
        """Plan once more, soon (coalesced: many events in one turn of the loop give one plan)."""
        if self._planning is None:
            self._planning = asyncio.get_running_loop().call_soon(self.plan_now)

    # ---- the queue ----------------------------------------------------------------------------------------
    def _may_enter(self, model: ManagedModel) -> bool:
        """The fast path: loaded, open, and nobody waits anywhere (then every request goes through the plan)."""
        return (model.state == State.LOADED and model.server is not None and not model.draining
                and not self._waiting and model.id not in self._closed and model.in_flight < self._slots[model.id]
                and not self._evicted_soon(model.id))

    def _evicted_soon(self, model_id: str) -> bool:
        return any(model_id in victims for victims in self._victims.values())

    def _grant(self, model: ManagedModel) -> None:
        model.acquire()
        self._turn_grants[model.id] = self._turn_grants.get(model.id, 0) + 1

    def _enqueue(self, model: ManagedModel, *, load_only: bool, priority: int | None, allow_eviction: bool,
                 arrived: float, timeout_s: float | None = None, start_timeout_s: float | None = None) -> _Waiter:
        if self.orch.closing:
            raise shutting_down()
        queue = self._queues[model.id]
        # MODEL_ORCHESTRATOR_MAX_QUEUE counts the requests that could not run at once in llama-server's slots
        limit = self.settings.max_queue and self.settings.max_queue + max(0, self._slots[model.id] - model.in_flight)
        if limit and not load_only and len(queue) >= limit:
            self.orch.metrics.queue_refusals.labels(model.id, Code.QUEUE_FULL.value).inc()
            raise Refused(Code.QUEUE_FULL, f"{model.id} already has {len(queue)} requests waiting (limit "
                          f"{self.settings.max_queue}, MODEL_ORCHESTRATOR_MAX_QUEUE, beyond its free slots); retry "
                          "later", retry_after=self._retry_after(model.id), model=model.id, waiting=len(queue),
                          limit=limit)
        timeout = timeout_s or self.settings.queue_timeout_s
        ticket = Ticket(next(self._ids), model.id, arrived, arrived + timeout, model.priority_for(priority), load_only)
        waiter = _Waiter(ticket, asyncio.get_running_loop().create_future(), allow_eviction, start_timeout_s)
        queue[ticket.id] = waiter
        self._changed(model.id, +1)
        return waiter

    async def _wait(self, model: ManagedModel, *, timeout_s: float | None, gone: Callable[[], bool] | None,
                    arrived: float) -> None:
        spec = model.spec
        waiter = self._enqueue(model, load_only=False, priority=None, arrived=arrived, timeout_s=timeout_s,
                               allow_eviction=self.orch.admission.allow_eviction(spec, None))
        self.plan_now()
        if not waiter.future.done():
            self.orch.events.publish("queued", model=model.id, waiting=len(self._queues[model.id]),
                                     state=model.state.value)
        try:
            while not waiter.future.done():
                await asyncio.wait([waiter.future], timeout=GONE_POLL_S if gone else None)
                if not waiter.future.done() and gone is not None and gone():
                    raise CallerGone()
        except BaseException:
            self._drop(waiter)
            raise
        waiter.future.result()  # raises the refusal that ended the wait

    def _drop(self, waiter: _Waiter) -> None:
        """Its caller is gone: out of the queue, or, granted already, the request it never sent is released."""
        queue = self._queues[waiter.ticket.model]
        if queue.pop(waiter.ticket.id, None) is not None:
            self._changed(waiter.ticket.model, -1)
            if not waiter.future.done():
                waiter.future.cancel()
            self.wake()
        elif waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None \
                and not waiter.ticket.load_only:
            model = self.orch.models[waiter.ticket.model]
            model.release()
            self.wake()

    def _finish(self, waiter: _Waiter, error: Refused | None = None) -> None:
        queue = self._queues[waiter.ticket.model]
        if queue.pop(waiter.ticket.id, None) is None:
            return
        self._changed(waiter.ticket.model, -1)
        if waiter.future.done():
            return
        if error is None:
            waiter.future.set_result(None)
        else:
            waiter.future.set_exception(error)

    def _changed(self, model_id: str, delta: int) -> None:
        self._waiting += delta
        self.orch.revision.bump()
        self.orch.metrics.child(self.orch.metrics.queue_depth, model_id).set(len(self._queues[model_id]))

    # ---- planning and the effects -------------------------------------------------------------------------
    def plan_now(self) -> None:
        """Run the policy over the queues now and carry out what it says (synchronous: no await between reading the
        state and acting on it)."""
        if self._planning is not None:
            self._planning.cancel()
            self._planning = None
        if self.orch.closing:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        tickets = [w.ticket for q in self._queues.values() for w in q.values()]
        if not tickets and not self._closed:
            return
        views, devices, residents = self._view(now)
        s = self.settings
        result = plan(tickets, views, devices, residents, now, Limits(s.vram_margin_mb, s.max_loaded,
                                                                      s.turn_requests, s.turn_seconds))
        self._perform(result, now)

    def _perform(self, result: Plan, now: float) -> None:
        waiters = {w.ticket.id: w for q in self._queues.values() for w in q.values()}
        for tid in result.expire:
            self._expire(waiters[tid], now)
        for model_id, decision in result.refuse.items():
            refusal = self.orch.admission.refusal(model_id, decision)
            for w in list(self._queues[model_id].values()):
                self.orch.metrics.queue_refusals.labels(model_id, refusal.code.value).inc()
                self._finish(w, refusal)
        for model_id in result.close - self._closed:
            log.info("%s: its turn is over; it drains, then makes room", model_id)
        self._closed = result.close
        for tid in result.grant:
            w = waiters[tid]
            model = self.orch.models[w.ticket.model]
            if not w.ticket.load_only:
                self._grant(model)
                self.orch.events.publish("granted", model=model.id, waited_s=round(now - w.ticket.arrived, 3))
            self._finish(w)
        for model_id, decision in result.load:
            self._starting.add(model_id)
            self._victims[model_id] = set(decision.evict)  # idle now: they stay so until the load evicts them
            self._started[model_id] = asyncio.get_running_loop().create_future()
            self._spawn(self._start(model_id, now))
        if result.prefetch and result.prefetch != self._prefetched:
            self._prefetched = result.prefetch
            self._spawn(self._prefetch(result.prefetch))
        wake_at = min([t for t in (result.wake_at, *self._retry_at.values()) if t is not None], default=None)
        if self._timer:
            self._timer.cancel()
            self._timer = None
        if wake_at is not None:
            self._timer = asyncio.get_running_loop().call_at(max(wake_at, now + 0.001), self.wake)

    def _expire(self, waiter: _Waiter, now: float) -> None:
        model = self.orch.models[waiter.ticket.model]
        waited = now - waiter.ticket.arrived
        what = self._waiting_for(model)
        self.orch.metrics.queue_refusals.labels(model.id, Code.QUEUE_TIMEOUT.value).inc()
        self.orch.events.publish("expired", model=model.id, waited_s=round(waited, 3), waiting_for=what)
        self._finish(waiter, Refused(
            Code.QUEUE_TIMEOUT, f"{model.id} was not served within {waited:.0f} s: it waited for {what}. Retry "
            "later, or allow a longer wait (header X-Queue-Timeout-S, MODEL_ORCHESTRATOR_QUEUE_TIMEOUT_S)",
            retry_after=self._retry_after(model.id), model=model.id, waited_s=round(waited, 3), waiting_for=what,
            queued_behind=sum(1 for w in self._queues[model.id].values() if w.ticket.arrived < waiter.ticket.arrived)))

    def _waiting_for(self, model: ManagedModel) -> str:
        if model.state == State.LOADING or model.id in self._starting:
            return "its load to finish"
        if model.state == State.LOADED:
            return "its turn (other models were served first)" if model.id in self._closed or model.draining \
                else "a free place among its requests"
        busy = [m.id for m in self.orch.models.values() if m.holds_process and m.id != model.id]
        return f"room: {', '.join(busy)} held the memory or the places" if busy else "room to load it"

    def _retry_after(self, model_id: str) -> int:
        return max(1, round(min(self.settings.turn_seconds, self.orch.models[model_id].swap_cost_s)))

    def _view(self, now: float) -> tuple[dict[str, ModelView], list, list[Resident]]:
        orch = self.orch
        devices, residents = orch.admission.placement_from(orch.admission.gpu_view.latest())
        views = {}
        for m in orch.models.values():
            need = self._need_mb(m)
            starting = m.id in self._starting or self._retry_at.get(m.id, 0) > now
            if starting and not m.holds_process:  # a load about to begin holds its place already
                residents.append(Resident(m.id, None, need or 0.0, m.priority, 0, now, loading=True,
                                          reload_s=m.swap_cost_s))
            starting = starting or need is None  # not plannable before its estimate is known
            need = need or 0.0
            if self._retry_at.get(m.id, now + 1) <= now:
                del self._retry_at[m.id]
            views[m.id] = ModelView(
                m.id, "starting" if starting else m.state.value, m.priority, need_mb=need,
                allow_eviction=self._allow_eviction(m), split=m.spec.split, in_flight=m.in_flight,
                swap_cost_s=m.swap_cost_s, loaded_at=self._loaded_at.get(m.id),
                turn_grants=self._turn_grants.get(m.id, 0), draining=m.draining or self._evicted_soon(m.id),
                load_on_demand=m.spec.load_on_demand, slots=self._slots[m.id],
                idle_since=self._idle_since.get(m.id) if m.in_flight == 0 else None)
        return views, devices, residents

    def _allow_eviction(self, model: ManagedModel) -> bool:
        """May its load evict idle models of equal priority? Yes if any ticket waiting for it may (each says: the
        request's allow_eviction, else the model's swap on demand)."""
        queue = self._queues[model.id]
        if not queue:
            return self.orch.admission.allow_eviction(model.spec, None)
        return any(w.allow_eviction for w in queue.values())

    def _need_mb(self, model: ManagedModel) -> float | None:
        """Its estimated GPU memory; None while it is being read (GPU mode: a model is planned once it is known),
        0 in CPU mode or when its header cannot be read (admission decides with the load)."""
        if model.estimate is not None:
            return model.estimate.total_mb
        if not self.orch.admission.gpu_view.available or self._estimating.get(model.id) is False:
            return 0.0
        if model.id not in self._estimating and self._queues[model.id]:
            self._estimating[model.id] = True
            self._spawn(self._estimate(model))
        return None

    async def _estimate(self, model: ManagedModel) -> None:
        try:
            model.estimate = await self.orch.admission.estimate(model.spec)
            del self._estimating[model.id]
        except Exception:  # noqa: BLE001 - an unreadable header: admission decides with the load
            self._estimating[model.id] = False
        self.wake()

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self, model_id: str, planned_at: float) -> None:
        """Start the load the plan chose: admission with fresh readings (it evicts the idle victims), then the load;
        a refusal now (memory moved) is tried again shortly; a failed load fails the requests that waited for it."""
        orch, model = self.orch, self.orch.models[model_id]
        loop = asyncio.get_running_loop()
        loads = [w for w in self._queues[model_id].values() if w.ticket.load_only]
        override = max((w.ticket.priority for w in loads if w.ticket.priority != model.priority), default=None)
        timeout = next((w.start_timeout_s for w in loads if w.start_timeout_s), None)
        allow = self._allow_eviction(model)
        waited_for_it = list(self._queues[model_id].values())
        try:
            evicted = await orch.start_load(model, priority=override, allow_eviction=allow, timeout_s=timeout,
                                            report_refusal=False)
        except Refused as exc:
            if exc.code in (Code.INSUFFICIENT_VRAM, Code.TOO_MANY_MODELS):
                self._retry_at[model_id] = loop.time() + RETRY_START_S
            else:  # files missing, shutting down...: the requests that waited get the reason
                for w in waited_for_it:
                    self._finish(w, exc)
            return
        finally:
            self._starting.discard(model_id)
            self._victims.pop(model_id, None)
            started = self._started.pop(model_id, None)
            if started is not None and not started.done():
                started.set_result(None)
            self.wake()
        if evicted is None:  # another load got there first: its outcome wakes us
            return
        for w in loads:
            w.evicted = tuple(evicted)
        if waited_for_it and waited_for_it[0].ticket.load_only:
            waited_for_it[0].joined = False
        orch.metrics.swaps.labels(model_id).inc()
        try:
            await model.join_load()
        except Refused as exc:  # the load failed or was cancelled: those who waited for it hear why
            for w in waited_for_it:
                self._finish(w, exc)
        else:
            self._learn_swap_cost(model_id, loop.time() - planned_at)
        self.wake()

    def _learn_swap_cost(self, model_id: str, seconds: float) -> None:
        """A swap's seconds (making room, then the load), on the loop's clock: the metric, and the model's swap cost
        that the policy weighs (the first swap, then a moving average)."""
        self.orch.metrics.swap_seconds.labels(model_id).observe(seconds)
        model = self.orch.models[model_id]
        model.swap_cost_s = (1 - _LEARN) * model.swap_cost_s + _LEARN * seconds if model_id in self._learned \
            else seconds
        self._learned.add(model_id)

    async def _prefetch(self, model_id: str) -> None:
        """Read the parts of the next model's files that are not cached yet into the page cache while its victims
        drain (within half the memory available; never an error)."""
        spec = self.orch.models[model_id].spec
        with contextlib.suppress(Exception):
            files = await asyncio.to_thread(self.orch.resolve_files, spec)
            paths = [p for p in (files.model, files.mmproj) if p is not None]
            await asyncio.get_running_loop().run_in_executor(self._prefetch_pool, page_cache.read_into_cache, paths)
