#!/usr/bin/env python3
"""The contention benchmark's GPU workload under a simulated clock, to weigh scheduling policies in seconds.

The real Orchestrator, Dispatcher, queue policy and state machine, with fake llama-servers (tests/support/
fake_server.py) whose loads and stops take what the H200 run measured (results/contention/h200/: median load per
model from the sidecar's log; an idle model's SIGKILL-to-exit), and 12 closed-loop clients each asking a random one
of 4 models, cap 2, 90 simulated seconds: the shape of `bench/contention.py --gpu`. A client sends its next request
--think-s after an answer (its HTTP round trip: an answer is never followed by the next request in the same instant),
and the first requests after a load take --first-s longer (a fresh llama-server's first batch). It prints goodput,
loads and the p99 wait, averaged over seeds, for the policy as shipped and for the variants given on the command line
(the policy's constants, a pinned model, plain LRU victims), so a change to scheduler.plan can be weighed before a
device run.

Usage: bench/contention_sim.py [--seeds 8] [--serve-s 0.04] [--think-s 0.003] [--first-s 0.1] [--stop-s 0.087]
       [--loads name=s,...] [--variant NAME:key=value,...]...
       variant keys: turn_per_swap, min_turn_s, linger_max_s, keep_per_reload_s (scheduler's constants),
       turn_seconds, turn_requests (settings), pin=MODEL (priority 1), lru=1 (victims by last use alone)
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import support.fake_server as fake  # noqa: E402
from support.registry import model, registry  # noqa: E402

from model_orchestrator.core import scheduler  # noqa: E402
from model_orchestrator.core.orchestrator import Orchestrator  # noqa: E402
from model_orchestrator.platform.settings import Settings  # noqa: E402

# median load seconds on the H200 (results/contention/h200/run3-contention-sidecar.log, two loads at a time)
H200_LOADS = {"qwen3-0.6b": 0.44, "llama-8b": 0.87, "llama-8b-32k": 0.88, "qwen3-30b-a3b": 2.35}


def _first_batch_slower(first_s: float):
    """FakeServer's serve, first_s longer for requests that come within first_s of its load (llama-server's first
    batch after its start: kernels and graphs not yet warm)."""
    plain_start, plain_serve = fake.FakeServer.start, fake.FakeServer.serve

    async def start(self, timeout):
        await plain_start(self, timeout)
        self.ready_at = asyncio.get_running_loop().time()

    async def serve(self, seconds):
        now = asyncio.get_running_loop().time()
        await plain_serve(self, seconds + max(0.0, getattr(self, "ready_at", now) + first_s - now))
    return start, serve


def _slow_stop(stop_s: float):
    plain = fake.FakeServer.stop

    async def stop(self, timeout):
        if self.exit is None:
            await asyncio.sleep(stop_s)  # the driver's teardown of a killed CUDA process
        return await plain(self, timeout)
    return stop


def run_once(seed: int, loads: dict[str, float], variant: dict, args) -> tuple[float, int, float]:
    tmp = Path(tempfile.mkdtemp(prefix="contention-sim-"))
    rng = random.Random(seed)
    fleet = fake.FakeFleet({m: fake.Behaviour(load_s=s, need_mb=5000) for m, s in loads.items()}, rng)
    for m in loads:
        (tmp / f"{m}.gguf").write_bytes(b"GGUF")
    reg = registry(*(model(m, path=tmp / f"{m}.gguf", save_slots=False, priority=int(variant.get("pin") == m))
                     for m in loads))
    loop = fake.VirtualClockLoop()

    async def main():
        settings = Settings(state_dir=tmp / "state", max_loaded=args.cap, slot_cache_mb=0, load_timeout_s=60,
                            **{k: cast(variant[k]) for k, cast in (("turn_seconds", float), ("turn_requests", int))
                               if k in variant})
        orch = Orchestrator(settings, reg, fake.FakeGpu(143_000), tmp / "llama-server", server_factory=fleet)
        fake.simulate(orch, fleet)
        answered, waits, t_end = 0, [], loop.time() + args.seconds

        async def client():
            nonlocal answered
            while loop.time() < t_end:
                m = rng.choice(list(loads))
                t0 = loop.time()
                async with orch.lease(orch.models[m]) as lease:
                    waits.append(loop.time() - t0)
                    await lease.server.serve(rng.expovariate(1 / args.serve_s))
                answered += 1
                await asyncio.sleep(args.think_s)
        await asyncio.gather(*(client() for _ in range(args.clients)))
        await orch.close()
        return answered, sorted(waits)

    try:
        answered, waits = loop.run_until_complete(main())
    finally:
        loop.close()
    return answered / args.seconds, fleet.spawns, waits[int(len(waits) * 0.99)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--cap", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--serve-s", type=float, default=0.04, help="mean service time of a request (exponential)")
    ap.add_argument("--think-s", type=float, default=0.003, help="a client's time from an answer to its next request")
    ap.add_argument("--first-s", type=float, default=0.1, help="how much longer the first batch after a load takes")
    ap.add_argument("--stop-s", type=float, default=0.087, help="how long an idle model's process takes to exit")
    ap.add_argument("--loads", default=",".join(f"{k}={v}" for k, v in H200_LOADS.items()))
    ap.add_argument("--variant", action="append", default=[], help="NAME:key=value,... (see the usage)")
    args = ap.parse_args()
    loads = {k: float(v) for k, v in (kv.split("=") for kv in args.loads.split(","))}
    fake.FakeServer.stop = _slow_stop(args.stop_s)
    fake.FakeServer.start, fake.FakeServer.serve = _first_batch_slower(args.first_s)
    variants = [("shipped", {})] + [(name, dict(kv.split("=") for kv in kvs.split(",")))
                                    for name, _, kvs in (v.rpartition(":") for v in args.variant)]
    print(f"{args.clients} clients x {len(loads)} models, cap {args.cap}, {args.seconds:g} simulated s, "
          f"service {args.serve_s} s, think {args.think_s} s, first batch +{args.first_s} s, stop {args.stop_s} s, "
          f"loads {loads}; means over {args.seeds} seeds\n")
    print("| policy | goodput (answers/s) | loads | wait p99 (s) |\n|---|---|---|---|")
    constants = ("TURN_PER_SWAP", "MIN_TURN_S", "LINGER_MAX_S", "KEEP_PER_RELOAD_S")
    shipped = {c: getattr(scheduler, c) for c in constants}
    first_to_go = scheduler._first_to_go
    for name, variant in variants:
        for c in constants:
            setattr(scheduler, c, float(variant.get(c.lower(), shipped[c])))
        if variant.get("lru"):  # victims by last use alone, never waiting for a busy one (the policy before)
            scheduler.KEEP_PER_RELOAD_S = 0.0
            scheduler._first_to_go = lambda *a: None
        runs = [run_once(seed, loads, variant, args) for seed in range(args.seeds)]
        scheduler._first_to_go = first_to_go
        print(f"| {name} | {statistics.mean(r[0] for r in runs):.2f} | {statistics.mean(r[1] for r in runs):.0f} | "
              f"{statistics.mean(r[2] for r in runs):.2f} |")
    for c in constants:
        setattr(scheduler, c, shipped[c])


if __name__ == "__main__":
    main()
