"""Load test: many concurrent clients mix load, unload, status and (streaming) chat against one sidecar on loopback,
with GPU memory made scarce on purpose, and the orchestrator's invariants are checked all along.

    .venv/bin/python bench/load_test.py --clients 200 --seconds 60

The sidecar runs as its own process (real llama-servers serving tiny generated models) over a stand-in GPU: NVML's
API played by tests/test_gpu.py's FakeNvml, a card of --total-mb, each llama-server estimated at --overhead-mb of
CUDA overhead, so only a couple of models fit at once and loads must evict or be refused. Checked at every sample
(every 50 ms): never two llama-servers for one model (found by scanning /proc for the marker every child carries in
its environment), never more memory committed (estimates of the models loading or loaded) than total - margin.
Checked for every answer: no 5xx except the documented ones with Retry-After (503 queue_full when a model's queue is
full, queue_timeout after the wait's bound, model_unloaded when a force unload ended a request), no request left
without an answer.
Prints a table; exits 1 when an invariant broke. tests/test_reliability.py runs a shorter variant in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from model_orchestrator.core.lifecycle import MODEL_ENV, OWNER_ENV, process_alive

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["tiny", "tiny-tools", "tiny-random", "tiny-gen"]
DOCUMENTED_503 = {"model_unloaded", "queue_full", "queue_timeout"}  # with Retry-After


# ---- the sidecar under test (a process of its own) -------------------------------------------------------------
def serve(args) -> None:
    """The sidecar with the stand-in GPU: `model-orchestrator serve`, except for the GPU view."""
    import logging

    sys.path.insert(0, str(ROOT / "tests"))
    from support.nvml import FakeNvml  # the stand-in the unit tests use

    from model_orchestrator.server import fast_lane
    from model_orchestrator.server.api import create_app
    from model_orchestrator.cli import use_production_event_loop
    from model_orchestrator.platform.gpu import GpuView
    from model_orchestrator.files.install import find_llama_server
    from model_orchestrator.core.orchestrator import Orchestrator
    from model_orchestrator.files.registry import load_registry
    from model_orchestrator.platform.settings import Settings

    logging.basicConfig(level=logging.WARNING)
    settings = Settings.from_env(state_dir=args.state, cuda_overhead_mb=args.overhead_mb, vram_margin_mb=args.margin_mb,
                                 max_queue=args.max_queue, stop_timeout_s=5, load_timeout_s=60)
    orch = Orchestrator(settings, load_registry(args.registry), GpuView(FakeNvml({0: []}, total_mb=args.total_mb),
                                                                        max_age_s=0), find_llama_server())
    use_production_event_loop()  # the loop `serve` runs on (uvloop): the races under test depend on it
    fast_lane.run_app(create_app(orch), host="127.0.0.1", port=args.port, access_log=None)  # as `serve` runs it


def write_models(d: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from support.tiny_models import write_tiny_model  # the tests' fixtures

    d.mkdir(parents=True, exist_ok=True)
    write_tiny_model(d / "hello.gguf", behaviour="hello", arch="qwen3")
    write_tiny_model(d / "tools.gguf", behaviour="tool_call", arch="qwen3")
    write_tiny_model(d / "random.gguf", behaviour="random", arch="llama")
    registry = d / "models.toml"
    registry.write_text(f"""
default_model = "tiny"
[[models]]
id = "tiny"
source = {{ type = "path", path = "{d / 'hello.gguf'}" }}
context_size = 512
[[models]]
id = "tiny-tools"
source = {{ type = "path", path = "{d / 'tools.gguf'}" }}
context_size = 512
[[models]]
id = "tiny-random"
source = {{ type = "path", path = "{d / 'random.gguf'}" }}
context_size = 1024
[[models]]
id = "tiny-gen"
source = {{ type = "generated" }}
context_size = 512
""")
    return registry


# ---- invariants from outside ------------------------------------------------------------------------------------
def instances(owner: str) -> dict[str, list[int]]:
    """Live llama-server processes of this sidecar, by model (zombies hold nothing and are skipped)."""
    marker = f"{OWNER_ENV}={owner}".encode()
    found: dict[str, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            if marker not in env or (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
        except OSError:
            continue
        model = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(MODEL_ENV.encode() + b"=")), "?")
        found[model].append(int(entry.name))
    return dict(found)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


# ---- the load -----------------------------------------------------------------------------------------------------
class Run:
    def __init__(self, url: str, owner: str, budget_mb: float):
        self.url, self.owner, self.budget_mb = url, owner, budget_mb
        self.counts: collections.Counter = collections.Counter()  # (op, outcome) -> n
        self.status_ms: list[float] = []
        self.violations: list[str] = []
        self.samples = 0
        self.max_instances = 0
        self.max_committed_mb = 0.0
        self.max_loaded = 0
        self.process_gaps_ms: list[float] = []

    def violate(self, what: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(what)

    async def status(self, http) -> dict | None:
        t0 = time.perf_counter()
        async with http.get(self.url + "/models/status") as r:
            body = await r.json()
        self.status_ms.append((time.perf_counter() - t0) * 1000)
        if r.status != 200:
            self.violate(f"/models/status answered {r.status}: {body}")
            return None
        return body

    def check(self, st: dict | None) -> None:
        """The invariants, on one status sample and the process list taken right after it."""
        self.samples += 1
        if st is not None:
            live = {m: s for m, s in st["loaded_models"].items() if s["status"] in ("loading", "loaded")}
            committed = sum(s["estimate_mb"] or 0 for s in live.values())
            self.max_committed_mb = max(self.max_committed_mb, committed)
            self.max_loaded = max(self.max_loaded, len(live))
            if committed > self.budget_mb + 0.01:
                self.violate(f"over budget: {committed:.0f} MB committed > {self.budget_mb:.0f} MB ({sorted(live)})")
        for model, pids in instances(self.owner).items():
            self.max_instances = max(self.max_instances, len(pids))
            if len(pids) > 1:
                self.violate(f"two instances of {model}: {pids}")

    def watch_processes(self, stop: threading.Event, period_s: float = 0.002) -> None:
        """In a thread: the sidecar's llama-servers by model every few ms (a duplicate would live 15-30 ms, far less
        than the status monitor's period). A process's environment is read once (pids are not reused within a run);
        later samples only list /proc and check the ones that are ours. The gaps between samples are kept to show
        the sampling was as fine as claimed."""
        marker = f"{OWNER_ENV}={self.owner}".encode()
        prefix = MODEL_ENV.encode() + b"="
        model_of: dict[int, str | None] = {}  # pid -> its model, or None when it is not one of ours
        last = time.monotonic()
        while not stop.is_set():
            live: dict[str, list[int]] = collections.defaultdict(list)
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                pid = int(entry)
                if pid not in model_of:
                    try:
                        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    except OSError:
                        continue
                    model_of[pid] = (next((e[len(prefix):].decode() for e in env if e.startswith(prefix)), "?")
                                     if marker in env else None)
                if model_of[pid] is not None and process_alive(pid):
                    live[model_of[pid]].append(pid)
            for model, pids in live.items():
                self.max_instances = max(self.max_instances, len(pids))
                if len(pids) > 1:
                    self.violate(f"two instances of {model}: {pids}")
            now = time.monotonic()
            self.process_gaps_ms.append((now - last) * 1000)
            last = now
            time.sleep(max(0.0, period_s - (time.monotonic() - now)))

    async def monitor(self, http, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                self.check(await self.status(http))
            except Exception as exc:  # noqa: BLE001
                self.violate(f"monitor: {exc!r}")
            await asyncio.sleep(0.05)

    def record(self, op: str, status: int, body, headers) -> None:
        code = body.get("error", {}).get("code") if isinstance(body, dict) and isinstance(body.get("error"), dict) else None
        outcome = f"{status} {code}" if code else str(status)
        self.counts[(op, outcome)] += 1
        retry_after = headers.get("Retry-After") if headers else None
        if status >= 500 and not (status == 503 and code in DOCUMENTED_503 and retry_after):
            self.violate(f"{op}: {status} {code} {str(body)[:300]}")
        if status == 429:
            self.violate(f"{op}: 429 (a full queue is 503 queue_full): {body}")

    async def client(self, http, rng: random.Random, deadline: float) -> None:
        import aiohttp

        ops = ["status", "stream", "chat", "load", "unload", "v1_models"]
        weights = [30, 35, 10, 12, 8, 5]
        while time.monotonic() < deadline:
            op = rng.choices(ops, weights)[0]
            model = rng.choice(MODELS)
            try:
                await self.one(http, op, model, rng)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self.counts[(op, f"exception {type(exc).__name__}")] += 1
                self.violate(f"{op} {model}: no answer ({exc!r})")
            await asyncio.sleep(rng.uniform(0, 0.05))

    async def one(self, http, op: str, model: str, rng: random.Random) -> None:
        if op == "status":
            st = await self.status(http)
            self.counts[(op, "200" if st is not None else "error")] += 1
            return
        if op == "v1_models":
            async with http.get(self.url + "/v1/models") as r:
                self.record(op, r.status, await r.json(), r.headers)
            return
        if op == "load":
            body = {"model": model, "allow_eviction": rng.random() < 0.5, "wait": rng.random() < 0.8}
            async with http.post(self.url + "/models/load", json=body) as r:
                self.record(op, r.status, await r.json(), r.headers)
            return
        if op == "unload":
            body = {"model": model, "force": rng.random() < 0.3, "drain_timeout_s": 0.5}
            async with http.post(self.url + "/models/unload", json=body) as r:
                self.record(op, r.status, await r.json(), r.headers)
            return
        stream = op == "stream"
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream,
                "max_tokens": rng.randint(4, 48)}
        if model == "tiny-random":
            body["ignore_eos"] = True
        async with http.post(self.url + "/v1/chat/completions", json=body) as r:
            if r.status == 200 and stream:
                text = (await r.read()).decode()
                events = [e[6:] for e in text.split("\n\n") if e.startswith("data: ")]
                if not events:
                    self.counts[(op, "200 empty stream")] += 1
                    self.violate(f"stream of {model}: no events")
                elif events[-1] != "[DONE]":
                    last = json.loads(events[-1])
                    code = last.get("error", {}).get("code") if isinstance(last, dict) else None
                    self.counts[(op, f"200+sse {code}")] += 1
                    if code != "model_unloaded":  # the documented end of a stream cut by a force unload
                        self.violate(f"stream of {model} ended with {events[-1][:200]}")
                else:
                    self.counts[(op, "200")] += 1
                return
            data = await r.read()
            try:
                parsed = json.loads(data)
            except ValueError:
                parsed = {"raw": data[:200].decode(errors="replace")}
            self.record(op, r.status, parsed, r.headers)


async def drive(url: str, owner: str, budget_mb: float, clients: int, seconds: float, seed: int = 1) -> Run:
    import aiohttp

    run = Run(url, owner, budget_mb)
    stop = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http:
        mon = asyncio.create_task(run.monitor(http, stop))
        stop_watch = threading.Event()
        watcher = threading.Thread(target=run.watch_processes, args=(stop_watch,), daemon=True)
        watcher.start()
        deadline = time.monotonic() + seconds
        t0 = time.monotonic()
        try:
            await asyncio.gather(*(run.client(http, random.Random(seed * 1000 + i), deadline) for i in range(clients)))
        finally:
            stop_watch.set()
            watcher.join()
        run.wall_s = time.monotonic() - t0
        stop.set()
        await mon
        # quiescent: nothing may be left in flight, and the state must read back consistently
        st = await run.status(http)
        run.check(st)
        for m, s in (st or {}).get("loaded_models", {}).items():
            if s["in_flight"] or s["draining"]:
                run.violate(f"{m} still shows in_flight={s['in_flight']} draining={s['draining']} after the load")
            if s["status"] not in ("loaded", "failed", "unloaded"):
                run.violate(f"{m} is {s['status']} after the load")
        for m in MODELS:  # everything can still be unloaded, and nothing stays behind
            async with http.post(url + "/models/unload", json={"model": m, "force": True}) as r:
                if r.status != 200:
                    run.violate(f"final unload of {m}: {r.status} {await r.text()}")
        left = instances(owner)
        if left:
            run.violate(f"llama-servers left after unloading everything: {left}")
    return run


def table(run: Run, clients: int, seconds: float) -> str:
    lines = [f"load test: {clients} clients for {seconds:g} s (ran {run.wall_s:.1f} s), budget {run.budget_mb:.0f} MB",
             "", f"{'operation':<10} {'answer':<34} {'count':>7}"]
    for (op, outcome), n in sorted(run.counts.items()):
        lines.append(f"{op:<10} {outcome:<34} {n:>7}")
    by_status = collections.Counter()
    for (op, outcome), n in run.counts.items():
        by_status[outcome.split()[0]] += n
    total = sum(run.counts.values())
    lines += ["", "by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(by_status.items())) + f" (total {total}, "
              f"{total / max(run.wall_s, 1e-9):.0f} requests/s)",
              f"/models/status latency (ms, {len(run.status_ms)} calls): p50 {percentile(run.status_ms, 50):.1f}, "
              f"p95 {percentile(run.status_ms, 95):.1f}, p99 {percentile(run.status_ms, 99):.1f}, "
              f"max {max(run.status_ms, default=float('nan')):.1f}",
              f"processes sampled {len(run.process_gaps_ms)} times, gap p50 {percentile(run.process_gaps_ms, 50):.1f} ms, "
              f"p99 {percentile(run.process_gaps_ms, 99):.1f} ms",
              f"invariants over {run.samples} samples: max instances of one model {run.max_instances}, "
              f"max committed {run.max_committed_mb:.0f} / {run.budget_mb:.0f} MB, max models loading+loaded "
              f"{run.max_loaded}",
              f"violations: {len(run.violations)}"]
    lines += [f"  - {v}" for v in run.violations[:20]]
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sidecar:
    """bench/load_test.py --serve as a subprocess, with its own models, registry and state dir."""

    def __init__(self, workdir: Path, *, total_mb: float, overhead_mb: float, margin_mb: float, max_queue: int):
        self.workdir = workdir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = workdir / "state"
        self.registry = write_models(workdir / "models")
        self.budget_mb = total_mb - margin_mb
        self.argv = [sys.executable, str(Path(__file__).resolve()), "--serve", "--port", str(self.port),
                     "--state", str(self.state), "--registry", str(self.registry), "--total-mb", str(total_mb),
                     "--overhead-mb", str(overhead_mb), "--margin-mb", str(margin_mb), "--max-queue", str(max_queue)]
        self.log = workdir / "sidecar.log"
        self.proc: subprocess.Popen | None = None

    @property
    def owner(self) -> str:
        return str(self.state.resolve())

    def __enter__(self) -> "Sidecar":
        import urllib.request

        self.proc = subprocess.Popen(self.argv, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sidecar did not start")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def run_load(clients: int, seconds: float, *, workdir: Path, total_mb: float = 2700, overhead_mb: float = 1000,
             margin_mb: float = 200, max_queue: int = 64, seed: int = 1) -> tuple[Run, Sidecar]:
    with Sidecar(workdir, total_mb=total_mb, overhead_mb=overhead_mb, margin_mb=margin_mb, max_queue=max_queue) as sc:
        run = asyncio.run(drive(sc.url, sc.owner, sc.budget_mb, clients, seconds, seed))
    left = instances(sc.owner)
    if left:
        run.violate(f"llama-servers outlived the sidecar: {left}")
    return run, sc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--total-mb", type=float, default=2700, help="the stand-in GPU's memory")
    ap.add_argument("--overhead-mb", type=float, default=1000, help="CUDA overhead per llama-server (estimate)")
    ap.add_argument("--margin-mb", type=float, default=200)
    ap.add_argument("--max-queue", type=int, default=64, help="MODEL_ORCHESTRATOR_MAX_QUEUE")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the counts and figures here")
    ap.add_argument("--workdir", type=Path, help="keep models, state and the sidecar's log here (default: a temp dir)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--registry", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args)
        return
    with tempfile.TemporaryDirectory(prefix="load-test-") as tmp:
        run, _ = run_load(args.clients, args.seconds, workdir=args.workdir or Path(tmp), total_mb=args.total_mb,
                          overhead_mb=args.overhead_mb, margin_mb=args.margin_mb, max_queue=args.max_queue,
                          seed=args.seed)
    print(table(run, args.clients, args.seconds))
    if args.json:
        args.json.write_text(json.dumps({
            "clients": args.clients, "seconds": args.seconds, "counts": {f"{o} | {a}": n for (o, a), n in run.counts.items()},
            "status_ms": {"p50": percentile(run.status_ms, 50), "p99": percentile(run.status_ms, 99)},
            "max_instances": run.max_instances, "max_committed_mb": run.max_committed_mb, "budget_mb": run.budget_mb,
            "violations": run.violations}, indent=2))
    sys.exit(1 if run.violations else 0)


if __name__ == "__main__":
    main()
