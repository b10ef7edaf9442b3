"""The admission and eviction policy, table-driven: one row per situation, the decision it must give."""

import pytest

from model_orchestrator.core.scheduler import Device, Request, Resident, available, decide

GPU32 = [Device(0, total_mb=32607, foreign_mb=0)]


def res(id, mb, prio=0, busy=0, used=0.0, gpu=0, loading=False, leaving=False, reload=1.0):
    return Resident(id, gpu, mb, prio, busy, used, loading, leaving, reload_s=reload)


CASES = [
    # name, request, devices, residents, margin, max_loaded -> admit, gpu, evict, missing, evictable
    ("fits on an empty card", Request("q", 17800, 10), GPU32, [], 512, 0, True, 0, [], 0, []),
    ("the guide's table: Qwen3-VL + Ovi-sized load does not fit, nothing evictable at higher priority",
     Request("ovi", 22000, 5), GPU32, [res("qwen", 17800, 10)], 512, 0, False, 0, [], 7705, []),
    ("lower priority idle model is evicted by the priority rule alone",
     Request("q", 17800, 10), GPU32, [res("small", 20000, 1)], 512, 0, True, 0, ["small"], 0, []),
    ("equal priority needs allow_eviction: refused, but named as evictable",
     Request("q", 17800, 5), GPU32, [res("other", 20000, 5)], 512, 0, False, 0, [], 5705, ["other"]),
    ("equal priority with allow_eviction: evicted",
     Request("q", 17800, 5, allow_eviction=True), GPU32, [res("other", 20000, 5)], 512, 0, True, 0, ["other"], 0, []),
    ("lower priority first, then least recently used among equals",
     Request("q", 17000, 9, allow_eviction=True), GPU32,
     [res("a", 8000, 3, used=50), res("b", 8000, 2, used=90), res("c", 8000, 3, used=10), res("d", 6000, 9, used=1)],
     512, 0, True, 0, ["b", "c"], 0, []),
    ("among equals by standing: last use + 4 s per second of reload (a cheap model goes before a recent costly one)",
     Request("q", 17000, 5, allow_eviction=True), GPU32,
     [res("costly", 8000, 5, used=100, reload=3.0), res("cheap", 8000, 5, used=101, reload=0.5),
      res("old", 8000, 5, used=50, reload=3.0), res("recent", 6000, 5, used=120, reload=0.5)],
     512, 0, True, 0, ["old", "cheap"], 0, []),
    ("a model with requests in flight is never evicted unless forced",
     Request("q", 17800, 10, allow_eviction=True), GPU32, [res("busy", 20000, 1, busy=2)], 512, 0, False, 0, [], 5705, []),
    ("forced: the busy model goes",
     Request("q", 17800, 10, allow_eviction=True, force=True), GPU32, [res("busy", 20000, 1, busy=2)], 512, 0,
     True, 0, ["busy"], 0, []),
    ("a higher-priority model is never evicted for a lower one",
     Request("q", 17800, 1, allow_eviction=True), GPU32, [res("vip", 20000, 50)], 512, 0, False, 0, [], 5705, []),
    ("foreign memory (WhisperX) counts", Request("q", 17800, 10), [Device(0, 32607, foreign_mb=15000)], [], 512, 0,
     False, 0, [], 705, []),
    ("a reservation counts even before its service allocates",
     Request("q", 17800, 10), [Device(0, 32607, foreign_mb=0, reserved_mb=28000)], [], 512, 0, False, 0, [], 13705, []),
    ("foreign and reserved are the same memory: the larger counts, not the sum",
     Request("q", 17800, 10), [Device(0, 32607, foreign_mb=6000, reserved_mb=6000)], [], 512, 0, True, 0, [], 0, []),
    ("a model still loading holds its estimate and is not evicted",
     Request("q", 17800, 10, allow_eviction=True), GPU32, [res("l", 20000, 1, loading=True)], 512, 0,
     False, 0, [], 5705, []),
    ("cap on loaded models evicts the least recently used even when memory fits",
     Request("q", 1000, 5, allow_eviction=True), GPU32, [res("a", 1000, 5, used=2), res("b", 1000, 5, used=1)],
     512, 2, True, 0, ["b"], 0, []),
    ("cap reached and nothing evictable: refused", Request("q", 1000, 5), GPU32, [res("a", 1000, 5)], 512, 1,
     False, 0, [], 0, ["a"]),
    ("two GPUs: the one with room, without evicting",
     Request("q", 17800, 10), [Device(0, 32607, 20000), Device(1, 32607, 0)], [], 512, 0, True, 1, [], 0, []),
    ("two GPUs: evict where it costs least (the lower-priority victim)",
     Request("q", 17800, 10, allow_eviction=True), [Device(0, 24576, 0), Device(1, 24576, 0)],
     [res("p5", 20000, 5, gpu=0), res("p2", 20000, 2, gpu=1)], 512, 0, True, 1, ["p2"], 0, []),
    ("a model still stopping counts in memory and is no victim: refused until it has exited",
     Request("q", 17800, 10, allow_eviction=True), GPU32, [res("going", 20000, 1, leaving=True)], 512, 0,
     False, 0, [], 5705, []),
    ("a model still stopping counts against the cap",
     Request("q", 1000, 5, allow_eviction=True), GPU32, [res("going", 1000, 5, leaving=True)], 512, 1,
     False, 0, [], 0, []),
    ("GPU mode, a cap of one: a CPU-only model (no memory on any GPU) is evicted for the cap",
     Request("q", 1000, 5, allow_eviction=True), GPU32, [res("cpu-only", 0, 5, gpu=None)], 512, 1,
     True, 0, ["cpu-only"], 0, []),
    ("a reservation is memory, not a model: the cap does not evict for it",
     Request("reservation:comfyui", 1, 50, is_model=False), GPU32, [res("a", 1000, 5)], 512, 1, True, 0, [], 0, []),
    ("reloading a model does not count its own memory against it",
     Request("q", 17800, 10), GPU32, [res("q", 17800, 10)], 512, 0, True, 0, [], 0, []),
]


@pytest.mark.parametrize("name, req, devices, residents, margin, cap, admit, gpu, evict, missing, evictable", CASES,
                         ids=[c[0] for c in CASES])
def test_policy(name, req, devices, residents, margin, cap, admit, gpu, evict, missing, evictable):
    d = decide(req, devices, residents, margin_mb=margin, max_loaded=cap)
    assert (d.admit, d.gpu, d.evict) == (admit, gpu, evict), d
    assert d.missing_mb == pytest.approx(missing, abs=1), d
    assert d.evictable == evictable, d
    assert d.reason


def test_split_over_devices_when_asked():
    devices = [Device(0, 24576, 0), Device(1, 24576, 12000)]
    d = decide(Request("big", 30000, 10, split=True), devices, [], margin_mb=512)
    assert d.admit and d.gpu is None and set(d.split) == {0, 1}
    assert sum(d.split.values()) == pytest.approx(30000, abs=1) and d.split[0] > d.split[1]
    assert not decide(Request("big", 30000, 10), devices, [], margin_mb=512).admit  # not without split


def test_cpu_mode_only_the_cap_applies():
    assert decide(Request("q", 10**9, 0), [], [res("a", 0)], margin_mb=512).admit
    d = decide(Request("q", 0, 0, allow_eviction=True), [], [res("a", 0, used=1), res("b", 0, used=2)], margin_mb=0, max_loaded=2)
    assert d.admit and d.evict == ["a"]


def test_available_subtracts_ours_the_larger_of_foreign_and_reserved_and_the_margin():
    dev = Device(0, 32000, foreign_mb=3000, reserved_mb=5000)
    assert available(dev, [res("a", 10000)], 500) == 32000 - 10000 - 5000 - 500


@pytest.mark.parametrize("devices", [GPU32, []], ids=["gpu", "cpu"])
def test_a_refusal_says_whether_memory_or_the_cap_is_the_reason(devices):
    cap = decide(Request("q", 1000, 5), devices, [res("a", 1000, 5)], margin_mb=512, max_loaded=1)
    assert not cap.admit and cap.refusal == "too_many_models" and "MODEL_ORCHESTRATOR_MAX_LOADED" in cap.reason
    if devices:
        mem = decide(Request("q", 40000, 5), devices, [], margin_mb=512)
        assert not mem.admit and mem.refusal == "insufficient_vram"


def test_cpu_mode_a_reservation_never_evicts_for_the_cap():
    d = decide(Request("reservation:x", 1, 50, is_model=False), [], [res("a", 0)], margin_mb=0, max_loaded=1)
    assert d.admit and d.evict == []


# ---- the queue policy (scheduler.plan): one row per situation, the plan it must give --------------------------------
from model_orchestrator.core.scheduler import Limits, ModelView, Ticket, plan  # noqa: E402

NOW = 1000.0
LIMITS = Limits(margin_mb=512, max_loaded=1, turn_requests=4, turn_seconds=10)


def t(id, model, age=1.0, prio=0, load_only=False, bound=600.0):
    return Ticket(id, model, NOW - age, NOW - age + bound, prio, load_only)


def view(id, state="unloaded", prio=0, busy=0, loaded_for=None, grants=0, swap=1.0, need=0.0, slots=4, **kw):
    return ModelView(id, state, prio, need_mb=need, in_flight=busy, swap_cost_s=swap,
                     loaded_at=None if loaded_for is None else NOW - loaded_for, turn_grants=grants, slots=slots, **kw)


def resident(v: ModelView, used_ago: float = 5.0) -> Resident:
    return Resident(v.id, None, v.need_mb, v.priority, v.in_flight, NOW - used_ago, loading=v.state == "loading",
                    leaving=v.state == "unloading", reload_s=v.swap_cost_s)


PLAN_CASES = [
    # name, tickets, models, limits -> grant, load, close, refuse, expire, prefetch
    ("a loaded model serves its queue, as many at once as its slots",
     [t(1, "a"), t(2, "a"), t(3, "a")], [view("a", "loaded", loaded_for=1, slots=2)], LIMITS,
     [1, 2], [], set(), [], [], None),
    ("an unloaded model that fits loads", [t(1, "a")], [view("a")], LIMITS, [], ["a"], set(), [], [], None),
    ("an idle model makes room at once (the turn does not hold an idle model)",
     [t(1, "b")], [view("a", "loaded", loaded_for=1), view("b")], LIMITS, [], ["b"], set(), [], [], None),
    ("a busy model keeps its turn: its queue is served within the turn's budget, the next model waits (prefetched)",
     [t(1, "b", age=2), t(2, "a"), t(3, "a"), t(4, "a")], [view("a", "loaded", busy=1, loaded_for=1, grants=2),
                                                          view("b")], LIMITS,
     [2, 3], [], {"a"}, [], [], "b"),
    ("a busy model whose turn is over (turn_length: 4 x the waiting model's swap) closes and drains",
     [t(1, "b"), t(2, "a")], [view("a", "loaded", busy=1, loaded_for=5), view("b", swap=1.0)], LIMITS,
     [], [], {"a"}, [], [], "b"),
    ("an expensive swap makes the turn longer: still open after 5 s",
     [t(1, "b"), t(2, "a")], [view("a", "loaded", busy=1, loaded_for=5), view("b", swap=2.0)], LIMITS,
     [2], [], set(), [], [], "b"),
    ("a higher-priority model ends the turn at once",
     [t(1, "b", prio=9), t(2, "a")], [view("a", "loaded", busy=1, loaded_for=0.1), view("b", prio=9)], LIMITS,
     [], [], {"a"}, [], [], "b"),
    ("a model that can never fit (a higher priority holds the only place) is refused, not queued",
     [t(1, "b")], [view("a", "loaded", prio=9, loaded_for=1), view("b")], LIMITS, [], [], set(), ["b"], [], None),
    ("without swap on demand an equal priority is never evicted: refused",
     [t(1, "b")], [view("a", "loaded", loaded_for=1), view("b", allow_eviction=False)], LIMITS,
     [], [], set(), ["b"], [], None),
    ("a ticket past its deadline expires", [t(1, "a", age=700)], [view("a", "loading")], LIMITS,
     [], [], set(), [], [1], None),
    ("more waiting requests per second of swap go first",
     [t(1, "b", age=3), t(2, "c", age=2), t(3, "c", age=2), t(4, "c", age=2)],
     [view("a", "loaded", busy=1, loaded_for=20), view("b"), view("c")], LIMITS, [], [], {"a"}, [], [], "c"),
    ("an equal queue and swap: the oldest request's model first",
     [t(1, "b", age=2), t(2, "c", age=3)], [view("a", "loaded", busy=1, loaded_for=20), view("b"), view("c")], LIMITS,
     [], [], {"a"}, [], [], "c"),
    ("a cheaper swap wins an equal queue",
     [t(1, "b", age=2), t(2, "c", age=2)], [view("a", "loaded", busy=1, loaded_for=20), view("b", swap=30),
                                            view("c", swap=1)], LIMITS, [], [], {"a"}, [], [], "c"),
    ("starving beats value: the oldest ticket's model goes first once it waited 3 x turn_seconds",
     [t(1, "b", age=31), t(2, "c", age=29), t(3, "c", age=29), t(4, "c", age=29)],
     [view("a", "loaded", busy=1, loaded_for=20), view("b"), view("c")], LIMITS, [], [], {"a"}, [], [], "b"),
    ("priority beats starving", [t(1, "b", age=100), t(2, "c", prio=5)],
     [view("a", "loaded", busy=1, loaded_for=20), view("b"), view("c", prio=5)], LIMITS, [], [], {"a"}, [], [], "c"),
    ("a model that loads only on request is not loaded for requests", [t(1, "m")],
     [view("m", load_on_demand=False)], LIMITS, [], [], set(), [], [], None),
    ("... but an explicit load loads it", [t(1, "m", load_only=True)], [view("m", load_on_demand=False)], LIMITS,
     [], ["m"], set(), [], [], None),
    ("a model being unloaded (draining) grants nothing", [t(1, "a")], [view("a", "loaded", loaded_for=1,
                                                                           draining=True)], LIMITS,
     [], [], set(), [], [], None),
    ("an explicit load of a loaded model is granted even beyond its slots",
     [t(1, "a", load_only=True)], [view("a", "loaded", busy=4, loaded_for=1)], LIMITS, [1], [], set(), [], [], None),
    ("a model still loading: its tickets wait, nothing else happens", [t(1, "a")], [view("a", "loading")], LIMITS,
     [], [], set(), [], [], None),
    ("with room for two, both waiting models load in one plan", [t(1, "a"), t(2, "b")], [view("a"), view("b")],
     Limits(margin_mb=512, max_loaded=2), [], ["a", "b"], set(), [], [], None),
    ("a model whose last request has just ended lingers (its caller comes back): the waiting model is prefetched",
     [t(1, "b")], [view("a", "loaded", loaded_for=1, idle_since=NOW - 0.01), view("b")], LIMITS,
     [], [], set(), [], [], "b"),
    ("... the returning caller is served in the linger", [t(1, "b"), t(2, "a", age=0.001)],
     [view("a", "loaded", loaded_for=1, idle_since=NOW - 0.01), view("b")], LIMITS, [2], [], set(), [], [], "b"),
    ("... and once the linger is over it makes room", [t(1, "b")],
     [view("a", "loaded", loaded_for=1, idle_since=NOW - 0.2), view("b")], LIMITS, [], ["b"], set(), [], [], None),
    ("a higher priority does not wait for a linger", [t(1, "b", prio=9)],
     [view("a", "loaded", loaded_for=1, idle_since=NOW - 0.01), view("b", prio=9)], LIMITS,
     [], ["b"], set(), [], [], None),
    ("the cheaper model goes first: the waiting model waits for the busy cheap one, not the idle expensive one",
     [t(1, "c")], [view("a", "loaded", loaded_for=1, swap=3.0), view("b", "loaded", busy=1, loaded_for=1, swap=0.5),
                   view("c")], Limits(margin_mb=512, max_loaded=2), [], [], set(), [], [], "c"),
    ("... and for a cheap one still loading (it serves what waits for it first)",
     [t(1, "c")], [view("a", "loaded", loaded_for=1, swap=3.0), view("b", "loading", swap=0.5), view("c")],
     Limits(margin_mb=512, max_loaded=2), [], [], set(), [], [], "c"),
    ("... and a busy expensive model's turn is not ended for it while the cheap one loads",
     [t(1, "c")], [view("a", "loaded", busy=1, loaded_for=20, swap=3.0), view("b", "loading", swap=0.5), view("c")],
     Limits(margin_mb=512, max_loaded=2), [], [], set(), [], [], "c"),
    ("... but when the expensive one is the cheaper to lose (both idle) it is the cheap one that goes",
     [t(1, "c")], [view("a", "loaded", loaded_for=1, swap=3.0), view("b", "loaded", loaded_for=1, swap=0.5),
                   view("c")], Limits(margin_mb=512, max_loaded=2), [], ["c"], set(), [], [], None),
]


@pytest.mark.parametrize("name,tickets,models,limits,grant,load,close,refuse,expire,prefetch", PLAN_CASES,
                         ids=[c[0] for c in PLAN_CASES])
def test_plan(name, tickets, models, limits, grant, load, close, refuse, expire, prefetch):
    views = {v.id: v for v in models}
    residents = [resident(v) for v in models if v.state in ("loading", "loaded", "unloading")]
    p = plan(tickets, views, [], residents, NOW, limits)
    assert p.grant == grant
    assert [m for m, _ in p.load] == load
    assert p.close == close
    assert sorted(p.refuse) == refuse
    assert p.expire == expire
    assert p.prefetch == prefetch


def test_plan_evicts_an_expensive_model_that_was_not_used_for_long():
    """Standing (GreedyDual): last use + KEEP_PER_RELOAD_S per second of reload. a (3 s reload) unused for 60 s stands
    below b (0.5 s, busy now): the waiting model evicts a rather than wait for b."""
    a, b = view("a", "loaded", loaded_for=70, swap=3.0), view("b", "loaded", busy=1, loaded_for=1, swap=0.5)
    p = plan([t(1, "c")], {"a": a, "b": b, "c": view("c")}, [], [resident(a, used_ago=60), resident(b, used_ago=0)],
             NOW, Limits(margin_mb=512, max_loaded=2))
    assert [(m, d.evict) for m, d in p.load] == [("c", ["a"])]
    recent = plan([t(1, "c")], {"a": a, "b": b, "c": view("c")}, [], [resident(a, used_ago=2),
                                                                      resident(b, used_ago=0)],
                  NOW, Limits(margin_mb=512, max_loaded=2))
    assert recent.load == [] and recent.prefetch == "c"  # used 2 s ago: it stays, c waits for b


def test_a_linger_is_a_small_part_of_the_waiting_models_swap():
    assert Limits.linger(1.0) == pytest.approx(0.05) and Limits.linger(0.02) == pytest.approx(0.002)
    p = plan([t(1, "b")], {"a": view("a", "loaded", loaded_for=1, idle_since=NOW - 0.01), "b": view("b", swap=1.0)},
             [], [resident(view("a", "loaded"))], NOW, LIMITS)
    assert p.wake_at == pytest.approx(NOW + 0.04)  # plans again when a's linger ends


def test_plan_wakes_at_the_next_deadline_or_turn_end():
    p = plan([t(1, "b", bound=30), t(2, "a")], {"a": view("a", "loaded", busy=1, loaded_for=1),
                                               "b": view("b", swap=1.0)},
             [], [resident(view("a", "loaded", busy=1))], NOW, LIMITS)
    assert p.wake_at == pytest.approx(NOW + 3.0)  # a's turn ends 4 s after its load (4 x b's 1 s swap)
