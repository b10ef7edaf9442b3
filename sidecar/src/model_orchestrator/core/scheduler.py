"""Admission and eviction, decided in one place, as a pure function of a snapshot (table-tested without a GPU).

For each GPU:  available = total - ours - max(foreign, reserved) - margin
  ours     = what our models hold or will hold: max(estimate, NVML-measured) of every model loading or loaded there
  foreign  = memory NVML sees held by processes we do not own (WhisperX, ComfyUI, another sidecar...)
  reserved = what other services declared through /reservations (counted even before they allocate it)
A load is admitted on the device where it fits; if it fits nowhere, models are evicted where that frees enough: idle
models of lower priority first, then among equal priority the lowest standing (`Resident.standing`: last use, plus
KEEP_PER_RELOAD_S seconds per second of reload, so cheap models are swapped before an expensive one). A model of
higher priority is never evicted for a lower one, nor one with requests in flight unless forced. Without eviction
allowed by the caller only strictly lower priorities may go (the priority rule); equal priorities need
allow_eviction (which the orchestrator grants by default: swap on demand). A model that is being unloaded still
counts (memory and cap) until its process has exited, and cannot be evicted again. Reservations are memory, not
models: they never count against the cap on loaded models. The refusal says why (`insufficient_vram` or
`too_many_models`), how many MB are missing and which models could be evicted.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..platform.errors import Code

SWAP_COST_PRIOR_S = 1.0  # a model's swap cost before its first swap taught one
KEEP_PER_RELOAD_S = 4.0  # a resident's standing: seconds of recency that one second of its reload is worth


@dataclass(frozen=True)
class Device:
    index: int
    total_mb: float
    foreign_mb: float
    reserved_mb: float = 0.0


@dataclass(frozen=True)
class Resident:
    """A model that is loading or loaded, as the policy sees it."""

    id: str
    gpu: int | None  # None: split over several devices (held_mb_by_gpu tells the shares)
    held_mb: float
    priority: int
    in_flight: int
    last_used: float  # monotonic seconds; older = smaller
    loading: bool = False
    leaving: bool = False  # being unloaded: counts until its process has exited, never a victim
    held_mb_by_gpu: dict[int, float] = field(default_factory=dict)
    reload_s: float = SWAP_COST_PRIOR_S  # what loading it again would cost: its learned swap (seconds)

    @property
    def standing(self) -> float:
        """Its claim to stay among equal priorities (GreedyDual's rule): when it was last used, plus
        KEEP_PER_RELOAD_S seconds for each second its reload would cost. The lowest goes first: cheap models are
        swapped, an expensive one stays unless it has not been used for a while."""
        return self.last_used + KEEP_PER_RELOAD_S * self.reload_s

    def on(self, gpu: int) -> float:
        if self.held_mb_by_gpu:
            return self.held_mb_by_gpu.get(gpu, 0.0)
        return self.held_mb if self.gpu == gpu else 0.0


@dataclass(frozen=True)
class Request:
    model: str
    need_mb: float
    priority: int
    allow_eviction: bool = False
    force: bool = False  # may evict models with requests in flight
    split: bool = False  # may spread over several devices (tensor split)
    is_model: bool = True  # False for a reservation: memory only, never counted against max_loaded


@dataclass
class Decision:
    admit: bool
    gpu: int | None = None  # the device; None with split
    split: dict[int, float] = field(default_factory=dict)  # device -> MB, when split
    evict: list[str] = field(default_factory=list)
    missing_mb: float = 0.0
    evictable: list[str] = field(default_factory=list)  # what the caller could allow to be evicted
    reason: str = ""
    refusal: Code | None = None  # why not: Code.INSUFFICIENT_VRAM or Code.TOO_MANY_MODELS


def available(device: Device, residents: list[Resident], margin_mb: float) -> float:
    ours = sum(r.on(device.index) for r in residents)
    return device.total_mb - ours - max(device.foreign_mb, device.reserved_mb) - margin_mb


def _eviction_order(residents: list[Resident], req: Request, gpu: int | None, *, allowed: bool,
                    for_cap: bool = False) -> list[Resident]:
    """Who may be evicted for `req`, best victims first: lower priority, then the lowest standing. On a device, the
    models holding memory there; with for_cap, after them those that hold none there (a CPU-only model, one on
    another GPU): evicting them frees no memory here but a place under MODEL_ORCHESTRATOR_MAX_LOADED."""
    if gpu is not None and for_cap:
        here = _eviction_order(residents, req, gpu, allowed=allowed)
        return here + [r for r in _eviction_order(residents, req, None, allowed=allowed) if r not in here]
    out = []
    for r in residents:
        if r.id == req.model or r.loading or r.leaving or (gpu is not None and r.on(gpu) <= 0):
            continue
        if r.in_flight and not req.force:
            continue
        if r.priority > req.priority:
            continue
        if r.priority == req.priority and not allowed:
            continue
        out.append(r)
    return sorted(out, key=lambda r: (r.priority, r.standing))


def decide(req: Request, devices: list[Device], residents: list[Resident], *, margin_mb: float,
           max_loaded: int = 0) -> Decision:
    """Where `req` goes and what must be evicted first; or why not."""
    if not devices:  # CPU mode: no memory to account; only the cap on loaded models applies
        return _cap_only(req, residents, max_loaded)
    others = [r for r in residents if r.id != req.model]
    over_cap = _over_cap(req, others, max_loaded)
    free = {d.index: available(d, others, margin_mb) for d in devices}

    # 1. fits somewhere as is (and under the cap): the device with the most room
    best = max(devices, key=lambda d: free[d.index])
    if free[best.index] >= req.need_mb and not over_cap:
        return Decision(True, gpu=best.index, reason="fits")
    if req.split and not over_cap and sum(max(0.0, f) for f in free.values()) >= req.need_mb:
        return Decision(True, split=_split(req.need_mb, free), reason="fits split over devices")

    # 2. eviction: per device, the fewest victims (in policy order) that make room
    plans = []
    for d in devices:
        chosen, freed = [], 0.0
        order = _eviction_order(others, req, d.index, allowed=req.allow_eviction, for_cap=over_cap > 0)
        for victim in order:
            if free[d.index] + freed >= req.need_mb and len(chosen) >= over_cap:
                break
            chosen.append(victim)
            freed += victim.on(d.index)
        if free[d.index] + freed >= req.need_mb and len(chosen) >= over_cap:
            plans.append((max(v.priority for v in chosen) if chosen else -1, len(chosen), -free[d.index], d.index, chosen))
    if plans:
        _, _, _, gpu, chosen = min(plans)
        return Decision(True, gpu=gpu, evict=[v.id for v in chosen],
                        reason=f"fits on GPU {gpu} after evicting {', '.join(v.id for v in chosen)}" if chosen else "fits")

    # 3. refuse: what is missing on the best device, and what the caller could allow to be evicted
    missing = max(0.0, req.need_mb - free[best.index])
    could = _eviction_order(others, Request(req.model, req.need_mb, req.priority, True, req.force), best.index,
                            allowed=True, for_cap=over_cap > 0)
    if missing:
        why, refusal = (f"needs {req.need_mb:.0f} MB, GPU {best.index} has {free[best.index]:.0f} MB available "
                        f"(margin {margin_mb:.0f} MB included)"), Code.INSUFFICIENT_VRAM
    else:
        why, refusal = _cap_reason(others, max_loaded), Code.TOO_MANY_MODELS
    return Decision(False, gpu=best.index, missing_mb=round(missing, 1), evictable=[r.id for r in could], reason=why,
                    refusal=refusal)


def _over_cap(req: Request, others: list[Resident], max_loaded: int) -> int:
    """How many models must go for `req` to stay within max_loaded (reservations are not models)."""
    if not max_loaded or not req.is_model:
        return 0
    return max(0, len(others) + 1 - max_loaded)


def _cap_reason(others: list[Resident], max_loaded: int) -> str:
    leaving = [r.id for r in others if r.leaving]
    return (f"at most {max_loaded} model(s) may be loaded (MODEL_ORCHESTRATOR_MAX_LOADED)"
            + (f"; still stopping: {', '.join(leaving)}" if leaving else ""))


def _cap_only(req: Request, residents: list[Resident], max_loaded: int) -> Decision:
    others = [r for r in residents if r.id != req.model]
    need = _over_cap(req, others, max_loaded)
    if not need:
        return Decision(True, reason="CPU mode: no GPU memory to account")
    order = _eviction_order(others, req, None, allowed=req.allow_eviction)
    if len(order) >= need:
        return Decision(True, evict=[r.id for r in order[:need]], reason=f"cap of {max_loaded} loaded models")
    could = _eviction_order(others, Request(req.model, 0, req.priority, True, req.force), None, allowed=True)
    return Decision(False, evictable=[r.id for r in could], reason=_cap_reason(others, max_loaded),
                    refusal=Code.TOO_MANY_MODELS)


def _split(need_mb: float, free: dict[int, float]) -> dict[int, float]:
    """Shares proportional to the room on each device."""
    room = {i: max(0.0, f) for i, f in free.items()}
    total = sum(room.values())
    return {i: round(need_mb * f / total, 1) for i, f in room.items() if f > 0}


# ---- the queue policy: which waiting request goes next, when a model's turn ends, what loads ---------------------
# Every proxied request and every explicit load waits as a Ticket until its model runs. `plan` is a pure function of
# (tickets, models, devices, residents, clock) -> Plan; dispatcher.py owns the tickets and performs the Plan.
#
#   * Grant: a loaded model that is not closing serves its tickets in arrival order, as many at once as llama-server
#     has parallel slots (the rest wait here, where a caller that hangs up leaves without costing llama-server).
#   * Head of line: among models that wait and are not loaded, the next one is chosen by priority (higher first),
#     then starvation (a model whose oldest ticket waited starve_after_s goes first, oldest first), then value: the
#     requests it would serve per second of its swap (learned from past swaps), the oldest first among equals.
#   * The head loads as soon as `decide` admits it with idle victims only, unless the model that should go first (the
#     lowest standing, busy and loading ones included) is busy or loading: then it waits for that one rather than
#     evict an idle one that stands higher. A loaded model whose last request has just ended lingers
#     (Limits.linger): its callers come back within milliseconds. If it fits only after models with requests
#     in flight are gone, those models' turns end (after turn_requests grants, or Limits.turn_length since they were
#     loaded: 4x the head's swap cost, 1 s to turn_seconds; at once when the head has a higher priority): they close
#     (grant nothing more), drain, and are evicted by the next plan. A victim that falls idle before its turn ends is
#     evicted once its linger is over. Meanwhile the head's model file is read into the page cache.
#   * Refused only when the head can never fit: not even with every model it may evict gone (409, decide's reason).
#   * Expired: a ticket past its deadline (503 queue_timeout, by the dispatcher).


@dataclass(frozen=True)
class Ticket:
    """A request, or an explicit load (`load_only`), waiting for its model."""

    id: int
    model: str
    arrived: float  # clock seconds
    deadline: float
    priority: int
    load_only: bool = False


@dataclass(frozen=True)
class ModelView:
    """One registry model as the queue policy sees it."""

    id: str
    state: str  # lifecycle.State's value; "starting" while the dispatcher is starting its load
    priority: int
    need_mb: float = 0.0  # the estimate (0 before one is known, and in CPU mode)
    allow_eviction: bool = True  # swap on demand: may its load evict idle models of equal priority?
    split: bool = False
    in_flight: int = 0
    swap_cost_s: float = SWAP_COST_PRIOR_S
    loaded_at: float | None = None  # clock; a turn starts when its model is loaded
    turn_grants: int = 0  # requests granted since it was loaded
    draining: bool = False  # an unload drains it: nothing is granted (the unload's decision, not the policy's)
    load_on_demand: bool = True  # False: only an explicit load (a load-only ticket) loads it
    slots: int = 0  # llama-server's parallel slots: at most this many requests in flight (0: no bound)
    idle_since: float | None = None  # clock: when its last request in flight ended (None: busy, or none yet)


@dataclass(frozen=True)
class Limits:
    margin_mb: float = 0.0
    max_loaded: int = 0
    turn_requests: int = 32
    turn_seconds: float = 10.0

    @property
    def starve_after_s(self) -> float:
        return 3 * self.turn_seconds

    def turn_length(self, head_swap_s: float) -> float:
        """How long a loaded model's turn lasts while another waits for its room: long enough that the swap costs
        at most a fifth of the time (TURN_PER_SWAP times the waiting model's swap), at least MIN_TURN_S, at most
        turn_seconds: cheap swaps switch often (short waits), expensive ones group more requests."""
        return min(self.turn_seconds, max(MIN_TURN_S, TURN_PER_SWAP * head_swap_s))

    @staticmethod
    def linger(head_swap_s: float) -> float:
        """How long a loaded model whose last request has just ended is kept while another waits for its room: its
        callers (an agent's loop, a workflow's next item) come back within milliseconds, and a model swapped out
        between two of their requests costs them a swap. At most LINGER_PER_SWAP of the waiting model's swap, and
        LINGER_MAX_S."""
        return min(LINGER_MAX_S, LINGER_PER_SWAP * head_swap_s)


@dataclass
class Plan:
    grant: list[int] = field(default_factory=list)  # ticket ids, in order
    expire: list[int] = field(default_factory=list)
    refuse: dict[str, Decision] = field(default_factory=dict)  # model -> why it can never fit
    load: list[tuple[str, Decision]] = field(default_factory=list)  # start these loads (victims are idle)
    close: set[str] = field(default_factory=set)  # loaded models whose turn is over: grant nothing, drain
    prefetch: str | None = None  # read this model's file into the page cache while its victims drain
    wake_at: float | None = None  # plan again by then (a deadline, a turn's end) even if nothing happens


_CANDIDATE_STATES = ("unloaded", "failed")
TURN_PER_SWAP = 4.0
MIN_TURN_S = 1.0
LINGER_PER_SWAP = 0.1
LINGER_MAX_S = 0.05


def plan(tickets: list[Ticket], models: dict[str, ModelView], devices: list[Device], residents: list[Resident],
         now: float, limits: Limits) -> Plan:
    out = Plan()
    waiting: dict[str, list[Ticket]] = {}
    for t in sorted(tickets, key=lambda t: (t.arrived, t.id)):
        if t.deadline <= now:
            out.expire.append(t.id)
        else:
            waiting.setdefault(t.model, []).append(t)
            out.wake_at = min(out.wake_at or t.deadline, t.deadline)
    # a loaded model whose queue is about to be served (grants come after the heads) counts as busy while its turn
    # lasts: it is not evicted before it served what waited for it
    about_to_serve = {m: sum(1 for t in ts if not t.load_only) for m, ts in waiting.items()
                      if models[m].state == "loaded" and not models[m].draining}
    just_idle = {m: v.idle_since for m, v in models.items() if v.state == "loaded" and not v.draining
                 and not v.in_flight and m not in about_to_serve and v.idle_since is not None}
    residents = list(residents)
    contended: dict[str, tuple[int, float]] = {}  # loaded model -> (priority, swap cost) of the head that needs it
    heads = sorted((m for m in waiting if models[m].state in _CANDIDATE_STATES
                    and (models[m].load_on_demand or any(t.load_only for t in waiting[m]))),
                   key=lambda m: _head_order(m, waiting[m], models[m], now, limits))
    for head in heads:
        view, prio = models[head], max(t.priority for t in waiting[head])
        req = Request(head, view.need_mb, prio, view.allow_eviction, split=view.split)
        serving = {m: n for m, n in about_to_serve.items() if n and _turn_budget(models[m], prio, view.swap_cost_s,
                                                                                   now, limits)}
        for m, idle_since in just_idle.items():  # it lingers (Limits.linger): counted busy until then
            until = idle_since + limits.linger(view.swap_cost_s)
            if now < until and _turn_budget(models[m], prio, view.swap_cost_s, now, limits):
                serving[m] = 1
                out.wake_at = min(out.wake_at or until, until)
        seen = [replace(r, in_flight=r.in_flight + serving[r.id]) if r.id in serving else r for r in residents]
        admitted = decide(req, devices, seen, margin_mb=limits.margin_mb, max_loaded=limits.max_loaded)
        first = None if admitted.admit and not admitted.evict else _first_to_go(seen, req, admitted.gpu)
        if first is not None and not (first.loading or first.in_flight):
            first = None  # idle: decide's victims are the right ones
        if first is not None:
            admitted = Decision(False)  # it waits for the one that should go first rather than evict one above it
        if admitted.admit:
            out.load.append((head, admitted))
            residents = [_leaving(r) if r.id in admitted.evict else r for r in residents]
            residents.append(Resident(head, admitted.gpu, view.need_mb, prio, 0, now, loading=True,
                                      held_mb_by_gpu=dict(admitted.split) or (
                                          {admitted.gpu: view.need_mb} if admitted.gpu is not None else {}),
                                      reload_s=view.swap_cost_s))
            continue
        permanent = [r for r in seen if not r.leaving and not _may_evict(r, req)]
        never = decide(req, devices, permanent, margin_mb=limits.margin_mb, max_loaded=limits.max_loaded)
        if not never.admit:
            out.refuse[head] = never
            continue
        if first is not None:  # busy: its turn ends and it drains; loading: it serves what waits for it first
            drained = Decision(True, evict=[] if first.loading else [first.id])
        else:
            drained = decide(Request(head, view.need_mb, prio, view.allow_eviction, force=True, split=view.split),
                             devices, seen, margin_mb=limits.margin_mb, max_loaded=limits.max_loaded)
        for victim in drained.evict if drained.admit else ():
            contended[victim] = (prio, view.swap_cost_s)
        out.prefetch = head
        break  # head of line: nobody overtakes the model that waits for room
    for model_id, ts in waiting.items():
        view = models[model_id]
        if view.state != "loaded" or view.draining:
            continue
        budget = None
        free = view.slots - view.in_flight if view.slots else None  # a request beyond the slots waits here
        if model_id in contended:
            budget = _turn_budget(view, *contended[model_id], now, limits)
        for t in ts:
            if t.load_only:
                out.grant.append(t.id)
            elif (budget is None or budget > 0) and (free is None or free > 0):
                out.grant.append(t.id)
                budget = None if budget is None else budget - 1
                free = None if free is None else free - 1
        if budget is not None and budget <= 0 and any(not t.load_only for t in ts):
            out.close.add(model_id)
    for model_id, (prio, cost) in contended.items():  # a victim whose turn is over closes; else plan at its end
        view = models[model_id]
        if _turn_budget(view, prio, cost, now, limits) == 0:
            out.close.add(model_id)
        elif view.loaded_at is not None:
            end = view.loaded_at + limits.turn_length(cost)
            out.wake_at = min(out.wake_at or end, end)
    return out


def _head_order(model: str, tickets: list[Ticket], view: ModelView, now: float, limits: Limits) -> tuple:
    oldest = tickets[0].arrived
    priority = max(t.priority for t in tickets)
    if now - oldest >= limits.starve_after_s:
        return (-priority, 0, oldest)
    return (-priority, 1, -len(tickets) / (1.0 + view.swap_cost_s), oldest)


def _turn_budget(view: ModelView, head_priority: float, head_swap_s: float, now: float, limits: Limits) -> int:
    """How many more requests a contended loaded model may be granted in its turn (0: the turn is over)."""
    if head_priority > view.priority or view.loaded_at is None:
        return 0
    if now - view.loaded_at >= limits.turn_length(head_swap_s):
        return 0
    return max(0, limits.turn_requests - view.turn_grants)


def _first_to_go(residents: list[Resident], req: Request, gpu: int | None) -> Resident | None:
    """Of the models `req` may evict (on `gpu`, or starting), busy and still loading ones included, the one whose
    standing is lowest."""
    candidates = [r for r in residents if r.id != req.model and not r.leaving and _may_evict(r, req)
                  and (gpu is None or r.gpu is None or r.on(gpu) > 0)]
    return min(candidates, key=lambda r: (r.priority, r.standing), default=None)


def _may_evict(r: Resident, req: Request) -> bool:
    return r.priority < req.priority or (r.priority == req.priority and req.allow_eviction)


def _leaving(r: Resident) -> Resident:
    return replace(r, leaving=True)
