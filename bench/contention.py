#!/usr/bin/env python3
"""Contention benchmark: many callers, more models than fit, against the sidecar and llama.cpp's router in one run.

N clients loop for S seconds; each request asks for a random one of M models (same binary, same flags, same model
files for both peers; at most CAP loaded: MODEL_ORCHESTRATOR_MAX_LOADED vs the router's --models-max). Every K-th
request streams and hangs up after 3 chunks (a client that leaves: n8n's Stop, a closed tab); the rest ask for a short
non-streamed answer. The peers run one after the other on the same machine. Per peer:

  answered        200s (a stream that got its 3 chunks counts as answered)
  refused         4xx answers, by code (409 too_many_models, 503 queue_full... whatever the peer said)
  5xx             5xx answers, by code, and requests that failed without an answer (connection errors)
  goodput         answers per second; also in the first --warmup seconds (cold loads) and after them
  wait p50/p99    the sidecar's queue wait (its X-Queue-Wait-Ms header); the router says none (`-`)
  latency p50/p99 request to its answer (to the 3rd chunk for hang-ups), both peers
  swaps           llama-server processes started during the run (sampled from /proc every 2 ms)
  max alive       the most llama-server processes alive at once
  after           in flight at the end (sidecar: /models/status), llama-server processes left after the peer stopped

CPU (default): three ids on the tiny generated GGUF. --gpu: four real shapes (bench/synthetic_gguf.py: Qwen3-0.6B,
Llama-3.1-8B, the 8B at 32K context, Qwen3-30B-A3B), all layers on the GPU.
Usage: bench/contention.py [--gpu] [--clients 6] [--seconds 30] [--cap 1] [--stream-every 5] [--peers sidecar,router]
       [--json OUT] [--md OUT] [--trace OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))
from peers import free_port, machine, pct, preset_lines, version, wait_http  # noqa: E402

from model_orchestrator.files.install import find_llama_server  # noqa: E402
from model_orchestrator.files.llama_args import build_argv  # noqa: E402
from model_orchestrator.files.registry import parse_registry  # noqa: E402

HI = [{"role": "user", "content": "hi"}]


class ProcessSampler:
    """llama-server children of `parent` (sidecar or router), sampled every 2 ms: spawns and the most alive."""

    def __init__(self, parent: int):
        self.parent, self.seen, self.max_alive = parent, set(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            alive = llama_children(self.parent)
            self.seen |= alive
            self.max_alive = max(self.max_alive, len(alive))
            time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def llama_children(parent: int) -> set[int]:
    """The parent's live llama-server children: from /proc/PARENT/task/*/children (a few small reads, so that the
    sampler takes little of the clients' time), else by scanning all of /proc."""
    try:
        pids = {int(p) for tid in os.listdir(f"/proc/{parent}/task")
                for p in open(f"/proc/{parent}/task/{tid}/children").read().split()}
    except OSError:
        pids = None
    if pids is not None:
        return {p for p in pids if _is_llama(p)}
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        comm = raw[raw.index(b"(") + 1:raw.rindex(b")")]
        state, ppid = raw.rsplit(b")", 1)[1].split()[:2]
        if int(ppid) == parent and comm == b"llama-server" and state != b"Z":
            out.add(int(entry))
    return out


async def wait_ready(http, url: str, proc: subprocess.Popen, name: str) -> None:
    """Until `url` answers 200; fails at once when the peer's process has exited (its log says why)."""
    ready = asyncio.ensure_future(wait_http(http, url, every=0.05, timeout=300))
    while not ready.done():
        if proc.poll() is not None:
            ready.cancel()
            raise RuntimeError(f"{name} exited with code {proc.returncode} before it was ready: see its log")
        await asyncio.wait([ready], timeout=0.1)
    ready.result()


class Sidecar:
    name = "sidecar"

    def __init__(self, registry: Path, work: Path, binary: Path, cap: int):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MODEL_ORCHESTRATOR_MODELS": str(registry), "MODEL_ORCHESTRATOR_PORT": str(self.port),
               "MODEL_ORCHESTRATOR_STATE": str(work / "state"), "LLAMA_SERVER_BIN": str(binary),
               "MODEL_ORCHESTRATOR_MAX_LOADED": str(cap)}
        self.proc = subprocess.Popen([sys.executable, "-m", "model_orchestrator", "serve"], env=env,
                                     stdout=open(work / "sidecar.log", "ab"), stderr=subprocess.STDOUT)

    async def ready(self, http) -> None:
        await wait_ready(http, self.base + "/health", self.proc, self.name)

    async def in_flight(self, http) -> int:
        async with http.get(self.base + "/models/status") as r:
            body = await r.json()
        return sum(m["in_flight"] for m in body["loaded_models"].values()) + sum(
            q["length"] for q in body.get("queues", {}).values())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


class Router:
    name = "router"

    def __init__(self, argvs: dict[str, list[str]], work: Path, binary: Path, cap: int):
        ini = ["version = 1"]
        for model, argv in argvs.items():
            ini += [f"[{model}]", *preset_lines(argv)]
        (work / "preset.ini").write_text("\n".join(ini) + "\n")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([str(binary), "--models-preset", str(work / "preset.ini"), "--models-max",
                                      str(cap), "--host", "127.0.0.1", "--port", str(self.port)],
                                     stdout=open(work / "router.log", "ab"), stderr=subprocess.STDOUT)

    async def ready(self, http) -> None:
        await wait_ready(http, self.base + "/models", self.proc, self.name)

    async def in_flight(self, http) -> int | None:
        return None  # the router does not say

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Tally:
    def __init__(self):
        self.outcomes: collections.Counter = collections.Counter()
        self.waits: list[float] = []
        self.latencies: list[float] = []
        self.answered = 0
        self.trace: list[list] = []  # per request: model, sent and answered (s from the start), wait (s), outcome

    def count(self, outcome: str, model: str, t0: float, wait: float | None = None) -> None:
        self.outcomes[outcome] += 1
        self.trace.append([model, round(t0 - self.start, 4), round(time.perf_counter() - self.start, 4), wait,
                           outcome])


async def one_request(http, base: str, model: str, stream: bool, tally: Tally, max_tokens: int) -> None:
    body = {"model": model, "messages": HI, "max_tokens": 64 if stream else max_tokens, "stream": stream}
    if stream:
        body["ignore_eos"] = True
    t0 = time.perf_counter()
    try:
        async with http.post(base + "/v1/chat/completions", json=body) as r:
            if r.status != 200:
                try:
                    code = (await r.json(content_type=None))["error"].get("code") or r.status
                except (ValueError, KeyError, TypeError, aiohttp.ClientError):
                    code = r.status
                tally.count(f"{r.status} {code}", model, t0)
                return
            wait = None
            if "X-Queue-Wait-Ms" in r.headers:
                wait = int(r.headers["X-Queue-Wait-Ms"]) / 1000
                tally.waits.append(wait)
            if stream:
                chunks = 0
                async for _ in r.content.iter_any():
                    chunks += 1
                    if chunks >= 3:
                        break
                r.close()  # hang up mid-stream
            else:
                await r.read()
            tally.latencies.append(time.perf_counter() - t0)
            tally.answered += 1
            tally.count("200 stream" if stream else "200", model, t0, wait)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        tally.count(f"error {exc.__class__.__name__}", model, t0)


async def drive(peer, models: list[str], args) -> dict:
    tally = Tally()
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as http:
        await peer.ready(http)
        sampler = ProcessSampler(peer.proc.pid)
        rng = random.Random(args.seed)
        sent = 0
        t_end = time.perf_counter() + args.seconds
        t0 = tally.start = time.perf_counter()

        async def client() -> None:
            nonlocal sent
            while time.perf_counter() < t_end:
                sent += 1
                await one_request(http, peer.base, rng.choice(models), sent % args.stream_every == 0, tally,
                                  args.max_tokens)

        await asyncio.gather(*(client() for _ in range(args.clients)))
        elapsed = time.perf_counter() - t0
        await asyncio.sleep(1.0)
        in_flight = await peer.in_flight(http)
    sampler.stop()
    peer.close()
    time.sleep(0.5)
    left = llama_children(peer.proc.pid) | {p for p in sampler.seen if os.path.exists(f"/proc/{p}")
                                            and _is_llama(p)}
    refused = {k: v for k, v in tally.outcomes.items() if k[:1] == "4"}
    errors = {k: v for k, v in tally.outcomes.items() if k[:1] == "5" or k.startswith("error")}
    return {
        "peer": peer.name, "requests": sum(tally.outcomes.values()), "answered": tally.answered,
        "refused": refused, "errors_5xx": errors, "goodput": round(tally.answered / elapsed, 2),
        "elapsed_s": round(elapsed, 1),
        "wait_p50_s": round(pct(tally.waits, 50), 3) if tally.waits else None,
        "wait_p99_s": round(pct(tally.waits, 99), 3) if tally.waits else None,
        "wait_max_s": round(max(tally.waits), 3) if tally.waits else None,
        "latency_p50_s": round(pct(tally.latencies, 50), 3) if tally.latencies else None,
        "latency_p99_s": round(pct(tally.latencies, 99), 3) if tally.latencies else None,
        "swaps": len(sampler.seen), "max_alive": sampler.max_alive, "in_flight_after": in_flight,
        "orphans_after": len(left), "trace": tally.trace,
        # the first seconds hold the cold loads (files read, first launches); after them, the swaps of a warm run
        "goodput_first": _rate(tally.trace, 0, args.warmup), "goodput_after": _rate(tally.trace, args.warmup, elapsed),
    }


def _rate(trace: list[list], start: float, end: float) -> float | None:
    """Answers per second that came between start and end (seconds from the run's start)."""
    if end <= start:
        return None
    return round(sum(1 for row in trace if row[4].startswith("200") and start <= row[2] < end) / (end - start), 2)


def _is_llama(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    return raw[raw.index(b"(") + 1:raw.rindex(b")")] == b"llama-server" and raw.rsplit(b")", 1)[1].split()[0] != b"Z"


def make_models(work: Path, gpu: bool) -> tuple[str, dict[str, str]]:
    if gpu:
        from synthetic_gguf import write_synthetic
        files = {"qwen3-0.6b": (write_synthetic(work / "q06.gguf", "qwen3-0.6b"), 8192),
                 "llama-8b": (write_synthetic(work / "l8.gguf", "llama-8b"), 8192),
                 "llama-8b-32k": (work / "l8.gguf", 32768),
                 "qwen3-30b-a3b": (write_synthetic(work / "q30.gguf", "qwen3-30b-a3b"), 8192)}
        common = 'flash_attn = "on"\nn_gpu_layers = 99'
        names = {"qwen3-0.6b": "Qwen3-0.6B shape, 8K", "llama-8b": "Llama-3.1-8B shape, 8K",
                 "llama-8b-32k": "Llama-3.1-8B shape, 32K", "qwen3-30b-a3b": "Qwen3-30B-A3B shape, 8K"}
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from support.tiny_models import write_tiny_model
        tiny = write_tiny_model(work / "tiny.gguf", behaviour="hello")
        files = {m: (tiny, 512) for m in ("tiny-a", "tiny-b", "tiny-c")}
        common = "n_gpu_layers = 0"
        names = {m: "the tiny generated GGUF" for m in files}
    text = f'default_model = "{next(iter(files))}"\n'
    for model, (path, ctx) in files.items():
        text += f'[[models]]\nid = "{model}"\nsource = {{ type = "path", path = "{path}" }}\n' \
                f"context_size = {ctx}\nsave_slots = false\n{common}\n"
    return text, names


async def run(args) -> dict:
    binary = find_llama_server()
    results = []
    with tempfile.TemporaryDirectory(prefix="contention-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        text, names = make_models(work, args.gpu)
        registry = work / "models.toml"
        registry.write_text(text)
        reg = parse_registry(text)
        argvs = {s.id: build_argv(binary, s, Path(s.source.path), None, 0) for s in reg.models}  # the sidecar's
        for name in args.peers.split(","):
            sub = work / name
            sub.mkdir()
            peer = Sidecar(registry, sub, binary, args.cap) if name == "sidecar" else Router(argvs, sub, binary,
                                                                                              args.cap)
            print(f"[contention] {name}: {args.clients} clients x {len(names)} models, cap {args.cap}, "
                  f"{args.seconds:g} s", file=sys.stderr)
            results.append(await drive(peer, list(names), args))
    return {"machine": machine(), "llama_server": version(binary), "models": names, "clients": args.clients,
            "seconds": args.seconds, "cap": args.cap, "stream_every": args.stream_every, "warmup": args.warmup,
            "results": results}


def table(res: dict) -> str:
    rows = res["results"]
    head = ["", *[r["peer"] for r in rows]]

    def fmt(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, dict):
            return ", ".join(f"{n} x {k}" for k, n in sorted(v.items())) or "0"
        return str(v)

    lines = [f"{res['clients']} clients x {len(res['models'])} models ({', '.join(res['models'])}), cap "
             f"{res['cap']}, {res['seconds']:g} s, every {res['stream_every']}th request streams and hangs up "
             f"after 3 chunks; {res['machine']}; llama-server {res['llama_server']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in (("requests", "requests"), ("answered", "answered"), ("refused", "refused (4xx)"),
                       ("errors_5xx", "5xx / no answer"), ("goodput", "goodput (answers/s)"),
                       ("goodput_first", f"goodput, first {res['warmup']:g} s"),
                       ("goodput_after", f"goodput, after {res['warmup']:g} s"),
                       ("wait_p50_s", "queue wait p50 (s)"), ("wait_p99_s", "queue wait p99 (s)"),
                       ("wait_max_s", "queue wait max (s)"), ("latency_p50_s", "latency p50 (s)"),
                       ("latency_p99_s", "latency p99 (s)"), ("swaps", "swaps (llama-servers started)"),
                       ("max_alive", "most llama-servers alive at once"), ("in_flight_after", "in flight after"),
                       ("orphans_after", "llama-servers left after stop")):
        lines.append(f"| {label} | " + " | ".join(fmt(r[key]) for r in rows) + " |")
    if len(rows) == 2 and rows[1]["goodput"]:
        lines.append(f"\ngoodput ratio {rows[0]['peer']}/{rows[1]['peer']}: "
                     f"{rows[0]['goodput'] / rows[1]['goodput']:.2f}x")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="four real shapes on the GPU (default: tiny models, CPU)")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--cap", type=int, default=1)
    ap.add_argument("--stream-every", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--warmup", type=float, default=15, help="goodput is also given before and after this (s)")
    ap.add_argument("--request-timeout", type=float, default=900)
    ap.add_argument("--peers", default="sidecar,router")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (the peers' logs)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--trace", type=Path, help="write every request (model, sent, answered, wait, outcome) here")
    args = ap.parse_args()
    res = asyncio.run(run(args))
    traces = {r["peer"]: r.pop("trace") for r in res["results"]}
    if args.trace:
        args.trace.write_text(json.dumps({"columns": ["model", "sent_s", "answered_s", "queue_wait_s", "outcome"],
                                          **traces}))
    out = table(res)
    print(out)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    if args.md:
        args.md.write_text(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
