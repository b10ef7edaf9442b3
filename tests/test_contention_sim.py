"""The queue and the scheduler under a simulated clock: the real Orchestrator, Dispatcher, policy and state machine,
with fake llama-servers (tests/support/fake_server.py) that load, crash and hang on demand. Thousands of requests
over several models, with random arrivals, priorities, crashes, cancels, hang-ups, explicit loads and unloads: every
request is answered or refused with a documented reason, none waits beyond its bound, the cap and the memory are
never exceeded, nothing is left in flight or alive at the end.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from support.fake_server import Behaviour, FakeFleet, FakeGpu, Served, VirtualClockLoop, simulate
from support.registry import model, registry

from model_orchestrator.platform.errors import Code, Refused
from model_orchestrator.platform.gpu import NoGpuView
from model_orchestrator.core.orchestrator import Orchestrator
from model_orchestrator.platform.settings import Settings

# what a request may end with besides an answer, and why (each documented in the README's error table)
ALLOWED = {
    Code.QUEUE_TIMEOUT.value,  # it waited its bound
    Code.QUEUE_FULL.value,  # MODEL_ORCHESTRATOR_MAX_QUEUE were waiting already
    Code.PROCESS_EXITED.value, Code.LOAD_TIMEOUT.value,  # the load it waited for failed
    Code.LOAD_CANCELLED.value,  # an unload cancelled the load it waited for
    Code.TOO_MANY_MODELS.value, Code.INSUFFICIENT_VRAM.value,  # it can never fit (higher priorities hold the room)
    "crashed_in_flight", "force_unloaded_in_flight",  # its llama-server ended under it (502/503 in the proxy)
    "hung_up",  # its caller left
}


@dataclass
class World:
    models: dict[str, Behaviour]
    priorities: dict[str, int]
    cap: int = 2
    gpu_mb: int | None = None  # None: CPU mode (the cap only)
    margin_mb: float = 512
    queue_timeout_s: float = 60.0
    violations: list[str] = field(default_factory=list)


def _registry(tmp_path, world: World):
    for m in world.models:
        (tmp_path / f"{m}.gguf").write_bytes(b"GGUF")
    return registry(*(model(m, path=tmp_path / f"{m}.gguf", priority=world.priorities.get(m, 0), save_slots=False)
                      for m in world.models))


def _orchestrator(tmp_path, world: World, fleet: FakeFleet) -> Orchestrator:
    settings = Settings(state_dir=tmp_path / "state", max_loaded=world.cap, queue_timeout_s=world.queue_timeout_s,
                        load_timeout_s=5, stop_timeout_s=1, vram_margin_mb=world.margin_mb, slot_cache_mb=0,
                        max_queue=40, turn_seconds=4, turn_requests=16)
    gpu = FakeGpu(world.gpu_mb) if world.gpu_mb else NoGpuView("simulated")
    orch = Orchestrator(settings, _registry(tmp_path, world), gpu, tmp_path / "llama-server", server_factory=fleet)
    simulate(orch, fleet)
    return orch


def _check_spawn(world: World):
    def check(fleet: FakeFleet) -> None:
        if world.cap and len(fleet.alive) > world.cap:
            world.violations.append(f"{len(fleet.alive)} processes alive, cap {world.cap}")
        if world.gpu_mb and fleet.alive_mb() > world.gpu_mb - world.margin_mb:
            world.violations.append(f"{fleet.alive_mb()} MB held, {world.gpu_mb - world.margin_mb} MB usable")
    return check


async def _simulate(orch: Orchestrator, world: World, rng: random.Random, *, requests: int, clients: int,
                    short_bounds: float):
    loop = asyncio.get_running_loop()
    outcomes: Counter = Counter()
    waits: list[float] = []
    models = list(world.models)
    weights = [rng.uniform(0.5, 3) for _ in models]
    sent = 0

    async def one(model: str, serve_s: float, bound: float) -> str:
        t0 = loop.time()
        try:
            async with orch.lease(orch.models[model], timeout_s=bound) as lease:
                waited = loop.time() - t0
                waits.append(waited)
                if waited > bound + 0.01:
                    world.violations.append(f"{model}: served after {waited:.2f} s, bound {bound} s")
                try:
                    await lease.server.serve(serve_s)
                except Served as s:
                    return "crashed_in_flight" if not s.exit.expected else "force_unloaded_in_flight"
                return "ok"
        except Refused as r:
            waited = loop.time() - t0
            if r.code == Code.QUEUE_TIMEOUT and abs(waited - bound) > 0.05:
                world.violations.append(f"{model}: expired after {waited:.2f} s, bound {bound} s")
            return r.code.value

    async def client(i: int) -> None:
        nonlocal sent
        while sent < requests:
            sent += 1
            model = rng.choices(models, weights)[0]
            bound = rng.uniform(1, 20) if rng.random() < short_bounds else world.queue_timeout_s
            task = asyncio.create_task(one(model, rng.expovariate(1 / 0.3), bound))
            if rng.random() < 0.03:  # the caller hangs up while it waits or while it is served
                loop.call_later(rng.uniform(0, 3), task.cancel)
            try:
                outcomes[await task] += 1
            except asyncio.CancelledError:
                outcomes["hung_up"] += 1
            r = rng.random()
            if r < 0.004:
                asyncio.create_task(orch.unload(rng.choice(models), force=rng.random() < 0.5, drain_timeout_s=2))
            elif r < 0.008:
                asyncio.create_task(_explicit_load(orch, rng.choice(models), outcomes))
            await asyncio.sleep(rng.expovariate(1 / 0.2))

    await asyncio.gather(*(client(i) for i in range(clients)))
    await asyncio.sleep(10)  # background unloads and loads end
    return outcomes, waits


async def _explicit_load(orch: Orchestrator, model: str, outcomes: Counter) -> None:
    try:
        await orch.ensure_loaded(model, wait=True)
        outcomes["explicit_load_ok"] += 1
    except Refused as r:
        outcomes[f"explicit_load_{r.code.value}"] += 1


def _run(tmp_path, world: World, *, seed: int, requests: int, clients: int, short_bounds: float = 0.2):
    rng = random.Random(seed)
    fleet = FakeFleet(world.models, rng, on_spawn=_check_spawn(world))
    loop = VirtualClockLoop()
    try:
        async def main():
            orch = _orchestrator(tmp_path, world, fleet)
            outcomes, waits = await _simulate(orch, world, rng, requests=requests, clients=clients,
                                              short_bounds=short_bounds)
            leftovers = {m.id: (m.in_flight, orch.dispatcher.queue_view(m.id)["length"]) for m in orch.models.values()
                         if m.in_flight or orch.dispatcher.queue_view(m.id)["length"]}
            await orch.close()
            return orch, outcomes, waits, leftovers

        orch, outcomes, waits, leftovers = loop.run_until_complete(main())
        sim_seconds = loop.time()
    finally:
        loop.close()
    return SimpleNamespace(orch=orch, outcomes=outcomes, waits=waits, leftovers=leftovers, fleet=fleet,
                           sim_seconds=sim_seconds)


WORLD_GPU = dict(
    models={"chat": Behaviour(load_s=1.5, need_mb=9000), "vision": Behaviour(load_s=3.0, need_mb=14000),
            "coder": Behaviour(load_s=1.0, need_mb=6000, crash_at_start=0.05),
            "small": Behaviour(load_s=0.3, need_mb=1500, crash_after_s=40.0),
            "embed": Behaviour(load_s=0.2, need_mb=800, hang=0.03),
            "tiny": Behaviour(load_s=0.1, need_mb=500)},
    priorities={"chat": 10, "vision": 0, "coder": 0, "small": 0, "embed": 5, "tiny": 0},
    cap=3, gpu_mb=24000)


@pytest.mark.parametrize("seed", [1, 2])
def test_ten_thousand_requests_over_six_models_on_one_gpu(tmp_path, seed):
    t0 = time.perf_counter()
    world = World(**WORLD_GPU)
    r = _run(tmp_path, world, seed=seed, requests=10_000, clients=40)
    real = time.perf_counter() - t0
    total = sum(v for k, v in r.outcomes.items() if not k.startswith("explicit_load"))
    assert total == 10_000, r.outcomes
    unexpected = {k: v for k, v in r.outcomes.items() if k != "ok" and k not in ALLOWED
                  and not k.startswith("explicit_load")}
    assert not unexpected, (unexpected, r.outcomes)
    assert not world.violations, world.violations[:10]
    assert not r.leftovers, r.leftovers
    assert not r.fleet.alive, "a fake llama-server outlived close()"
    assert r.outcomes["ok"] > 0.7 * total, r.outcomes
    assert r.fleet.spawns < total / 5, f"{r.fleet.spawns} loads for {total} requests: grouping does not work"
    assert real < 30, f"{real:.1f} s of test time"
    waits = sorted(r.waits)
    print(f"\n{r.sim_seconds:.0f} simulated s in {real:.1f} s: {dict(r.outcomes)}; {r.fleet.spawns} loads; wait "
          f"p50 {waits[len(waits) // 2]:.2f} s p99 {waits[int(len(waits) * 0.99)]:.2f} s")


def test_cpu_cap_one_three_models_everyone_served_in_turn(tmp_path):
    """The CPU goal in miniature: 3 models, cap 1, 6 clients: every request answered, never two processes, far
    fewer loads than requests, no wait beyond 30 s."""
    world = World(models={m: Behaviour(load_s=0.1) for m in ("a", "b", "c")}, priorities={}, cap=1,
                  queue_timeout_s=600)
    r = _run(tmp_path, world, seed=7, requests=3000, clients=6, short_bounds=0)
    assert set(r.outcomes) <= {"ok", "hung_up", "force_unloaded_in_flight", "load_cancelled"} | {
        k for k in r.outcomes if k.startswith("explicit_load")}, r.outcomes
    assert r.fleet.max_alive == 1 and not world.violations, world.violations
    assert max(r.waits) < 30, max(r.waits)
    # a swap for every other request without grouping (random models, cap 1); at most one per 4 requests here
    assert r.fleet.spawns < 3000 / 4, r.fleet.spawns


def test_a_model_that_can_never_fit_is_refused_at_once_not_queued(tmp_path):
    """Higher priorities hold the cap: a lower-priority model is refused (409 as before the queue), at once."""
    world = World(models={"vip": Behaviour(), "low": Behaviour()}, priorities={"vip": 10, "low": 0}, cap=1)
    loop = VirtualClockLoop()
    fleet = FakeFleet(world.models, random.Random(0))

    async def main():
        orch = _orchestrator(tmp_path, world, fleet)
        async with orch.lease(orch.models["vip"]):
            pass
        t0 = loop.time()
        with pytest.raises(Refused) as err:
            async with orch.lease(orch.models["low"]):
                pass
        assert loop.time() - t0 < 0.01 and err.value.code == Code.TOO_MANY_MODELS
        await orch.close()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_a_cheap_model_is_not_held_up_by_an_expensive_first_load(tmp_path):
    """Cap 2: a (cheap) is loaded and idle, x (3 s to load, never used before) is loading in the other place. b
    evicts a at once rather than wait for x: a model that is loading counts as used now, so its standing is not that
    of a model unused for ages (what made a whole run's start wait for the 30B's first load on the H200)."""
    world = World(models={"a": Behaviour(load_s=0.3), "b": Behaviour(load_s=0.3), "x": Behaviour(load_s=3.0)},
                  priorities={}, cap=2)
    loop = VirtualClockLoop()
    fleet = FakeFleet(world.models, random.Random(0))

    async def main():
        orch = _orchestrator(tmp_path, world, fleet)
        await asyncio.sleep(10)
        async with orch.lease(orch.models["a"]):
            pass

        async def use_x():
            async with orch.lease(orch.models["x"]):
                pass
        x = asyncio.create_task(use_x())
        await asyncio.sleep(0.1)
        assert orch.models["x"].state.value == "loading"
        t0 = loop.time()
        async with orch.lease(orch.models["b"]):
            assert loop.time() - t0 < 1.0, loop.time() - t0  # a's linger and b's load, not x's 3 s
        await x
        await orch.close()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
