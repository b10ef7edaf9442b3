#!/usr/bin/env python3
"""Peer benchmark (issue 12): the sidecar side by side with its two peers, same llama-server binary, same flags.

  bare     llama-server started by hand (exec, /health polled every millisecond, then the request)
  sidecar  model-orchestrator serve (registry with the two models, at most one loaded)
  router   llama.cpp's own router: llama-server --models-preset FILE.ini --models-max 1

The flags come from the sidecar's own llama_args.build_argv (--fit off, -c, -ngl, -fa, ...); the router's preset is
written from the same argument list. Every measure runs the peers interleaved (bare, sidecar, router, bare, ...)
so they share the machine's state. Rows:
  cold chat A / cold chat B     a chat request for an unloaded model -> its answer
  swap A -> B                   A loaded and used, a request for B -> its answer (A stopped for it)
  load -> ready                 an explicit load (bare: exec -> /health 200; router: POST /models/load -> loaded)
  small chat latency            p50 / p99 of sequential non-streamed requests, one token each (A loaded)
  streamed tok/s x1 and x8      generation speed with 1 and with 8 concurrent streams (B loaded)
  status throughput             200 concurrent clients for N s: sidecar GET /models/status vs router GET /models

Models: --gpu uses bench/synthetic_gguf.py's real shapes (A = Llama-3.1-8B, B = Qwen3-30B-A3B, Q4_0, 8K context,
all layers on the GPU); without it two tiny generated models (tiny_gguf) run on the CPU.
Usage: bench/peers.py [--gpu] [--reps 3] [--requests 300] [--status-seconds 10] [--only ROW,...] [--json OUT] [--md OUT]
--only runs some rows: cold, swap, load, latency, stream, status (the table shows only those).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))
from model_orchestrator.files.install import find_llama_server  # noqa: E402
from model_orchestrator.files.llama_args import build_argv  # noqa: E402
from model_orchestrator.server.proxy import UsageScanner  # noqa: E402
from model_orchestrator.files.registry import parse_registry  # noqa: E402

PEERS = ("bare", "sidecar", "router")
HI = [{"role": "user", "content": "hi"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def wait_http(http: aiohttp.ClientSession, url: str, ok=lambda status, body: status == 200, every: float = 0.001,
                    timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with http.get(url) as r:
                if ok(r.status, await r.read()):
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(every)
    raise TimeoutError(url)


async def chat(http, url: str, model: str, **extra) -> dict:
    async with http.post(url, json={"model": model, "messages": HI, **{"max_tokens": 8, **extra}}) as r:
        body = await r.json(content_type=None)
        if r.status != 200:
            raise RuntimeError(f"{url} {model}: {r.status} {body}")
        return body


# ---- the peers -------------------------------------------------------------------------------------------------
class Bare:
    name = "bare"

    def __init__(self, argvs: dict[str, list[str]]):
        self.argvs = argvs  # model id -> argv without --port
        self.procs: dict[str, tuple[subprocess.Popen, int]] = {}

    def url(self, model: str) -> str:
        return f"http://127.0.0.1:{self.procs[model][1]}/v1/chat/completions"

    async def start(self, http, model: str) -> None:
        port = free_port()
        proc = subprocess.Popen([*self.argvs[model], "--port", str(port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        self.procs[model] = (proc, port)
        await wait_http(http, f"http://127.0.0.1:{port}/health")

    async def stop(self, model: str, kill: bool = False) -> None:
        proc, _ = self.procs.pop(model)
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        await asyncio.to_thread(proc.wait)

    async def cold_chat(self, http, model: str) -> None:
        await self.start(http, model)
        await chat(http, self.url(model), model)

    async def swap(self, http, a: str, b: str) -> None:
        await self.stop(a, kill=True)  # what the sidecar does to an idle evicted model
        await self.cold_chat(http, b)

    async def load(self, http, model: str) -> None:
        await self.start(http, model)

    async def unload_all(self, http) -> None:
        for m in list(self.procs):
            await self.stop(m)

    def close(self) -> None:
        for proc, _ in self.procs.values():
            proc.kill()
            proc.wait()


class Sidecar:
    name = "sidecar"

    def __init__(self, registry: Path, work: Path, binary: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MODEL_ORCHESTRATOR_MODELS": str(registry), "MODEL_ORCHESTRATOR_PORT": str(self.port),
               "MODEL_ORCHESTRATOR_STATE": str(work / "state"), "LLAMA_SERVER_BIN": str(binary),
               "MODEL_ORCHESTRATOR_MAX_LOADED": "1", "MODEL_ORCHESTRATOR_LOG_LEVEL": "INFO"}  # INFO: load phases
        self.log = work / "sidecar.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "model_orchestrator", "serve"], env=env,
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        self.load_seconds: list[float] = []

    def url(self, model: str) -> str:
        return self.base + "/v1/chat/completions"

    async def cold_chat(self, http, model: str) -> None:
        await chat(http, self.url(model), model)

    async def swap(self, http, a: str, b: str) -> None:
        await chat(http, self.url(b), b)

    async def load(self, http, model: str) -> None:
        async with http.post(self.base + "/models/load", json={"model": model}) as r:
            assert r.status == 200, await r.text()
            self.load_seconds.append((await r.json())["load_seconds"])  # the sidecar's own: admission + start

    async def unload_all(self, http) -> None:
        async with http.get(self.base + "/models/status") as r:
            loaded = list((await r.json())["loaded_models"])
        for m in loaded:
            async with http.post(self.base + "/models/unload", json={"model": m, "force": True}) as r:
                await r.read()

    def load_phases(self) -> list[str]:
        """The sidecar's own account of each load (lifecycle: planned, spawned, ready_hint, healthy; ms)."""
        return [line.split("load phases (ms from the start of the load): ", 1)[1].strip()
                for line in self.log.read_text(errors="replace").splitlines() if "load phases" in line]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


class Router:
    name = "router"

    def __init__(self, argvs: dict[str, list[str]], work: Path, binary: Path):
        ini = ["version = 1"]
        for model, argv in argvs.items():
            ini += [f"[{model}]", *preset_lines(argv)]
        (work / "preset.ini").write_text("\n".join(ini) + "\n")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([str(binary), "--models-preset", str(work / "preset.ini"), "--models-max", "1",
                                      "--host", "127.0.0.1", "--port", str(self.port)],
                                     stdout=open(work / "router.log", "ab"), stderr=subprocess.STDOUT)

    def url(self, model: str) -> str:
        return self.base + "/v1/chat/completions"

    async def status(self, http) -> dict[str, str]:
        async with http.get(self.base + "/models") as r:
            return {m["id"]: m["status"]["value"] for m in (await r.json())["data"]}

    async def cold_chat(self, http, model: str) -> None:
        await chat(http, self.url(model), model)

    async def swap(self, http, a: str, b: str) -> None:
        await chat(http, self.url(b), b)

    async def load(self, http, model: str) -> None:
        async with http.post(self.base + "/models/load", json={"model": model}) as r:
            assert r.status == 200, await r.text()
        while (await self.status(http)).get(model) != "loaded":
            await asyncio.sleep(0.001)

    async def unload_all(self, http) -> None:
        for m, st in (await self.status(http)).items():
            if st != "unloaded":
                async with http.post(self.base + "/models/unload", json={"model": m}) as r:
                    await r.read()
        while any(st != "unloaded" for st in (await self.status(http)).values()):
            await asyncio.sleep(0.01)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def preset_lines(argv: list[str]) -> list[str]:
    """llama-server's command line as preset keys (the flag without dashes; a bare flag is `= true`)."""
    out, args, i = [], argv[1:], 0
    while i < len(args):
        key = args[i].lstrip("-")
        value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("-") else None
        i += 1 if value is None else 2
        if key in ("host", "port", "alias"):
            continue
        out.append(f"{'model' if key == 'm' else key} = {'true' if value is None else value}")
    return out


# ---- measures ----------------------------------------------------------------------------------------------------
async def timed(coro) -> float:
    t0 = time.perf_counter()
    await coro
    return time.perf_counter() - t0


async def stream_run(http, url: str, model: str, tokens: int, streams: int) -> float:
    """Tokens per second of `streams` concurrent streamed generations (total tokens / wall time)."""
    body = {"model": model, "messages": HI, "stream": True, "max_tokens": tokens, "ignore_eos": True}

    async def one() -> int:
        scanner = UsageScanner()
        async with http.post(url, json=body, headers={"Connection": "close"}) as r:
            assert r.status == 200, await r.text()
            async for chunk in r.content.iter_any():
                scanner.feed(chunk)
        assert scanner.completion_tokens == tokens, scanner.completion_tokens
        return tokens

    t0 = time.perf_counter()
    done = await asyncio.gather(*(one() for _ in range(streams)))
    return sum(done) / (time.perf_counter() - t0)


def _status_worker(url: str, clients: int, seconds: float, queue) -> None:
    async def run():
        lat, n = [], 0
        stop = time.perf_counter() + seconds
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            async def loop():
                nonlocal n
                while time.perf_counter() < stop:
                    t0 = time.perf_counter()
                    async with http.get(url) as r:
                        await r.read()
                        ok = r.status == 200
                    if ok:
                        lat.append(time.perf_counter() - t0)
                        n += 1
            await asyncio.gather(*(loop() for _ in range(clients)))
        return n, lat

    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    queue.put(asyncio.run(run()))


def cpu_seconds(pid: int) -> float:
    """CPU time of a process so far, all its threads, in ns resolution (Linux /proc/PID/task/*/schedstat; threads
    that ended are missed, which the sidecar's long-lived ones are not)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError):
            pass
    return total / 1e9


def status_load(url: str, clients: int, seconds: float, procs: int, server_pid: int) -> dict:
    """`clients` concurrent keep-alive clients spread over `procs` processes (so the client is not the limit).
    `cpu_us_per_req`: the server's CPU time per answer, which a machine with few cores shows better than req/s
    (there the clients and the server share the cores)."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    workers = [ctx.Process(target=_status_worker, args=(url, clients // procs + (i < clients % procs), seconds, q))
               for i in range(procs)]
    cpu0 = cpu_seconds(server_pid)
    for w in workers:
        w.start()
    results = [q.get() for _ in workers]
    cpu = cpu_seconds(server_pid) - cpu0
    for w in workers:
        w.join()
    n = sum(r[0] for r in results)
    lat = [x for r in results for x in r[1]]
    return {"req_per_s": n / seconds, "p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000, "requests": n,
            "cpu_us_per_req": 1e6 * cpu / max(n, 1)}


# ---- the run -------------------------------------------------------------------------------------------------------
def make_models(work: Path, gpu: bool, model_b: Path | None = None) -> tuple[str, dict]:
    if gpu:
        from synthetic_gguf import write_synthetic
        a = write_synthetic(work / "a.gguf", "llama-8b")
        b = write_synthetic(work / "b.gguf", "qwen3-30b-a3b")
        common = 'context_size = 8192\nflash_attn = "on"\nn_gpu_layers = 99'
        names = {"a": "8B shape (Llama-3.1-8B, Q4_0)", "b": "30B-A3B shape (Qwen3-30B-A3B, Q4_0)"}
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from support.tiny_models import write_tiny_model  # the tests' fixtures
        a = write_tiny_model(work / "a.gguf", behaviour="hello")
        b = write_tiny_model(work / "b.gguf", behaviour="random", arch="llama")
        common = "context_size = 4096\nn_gpu_layers = 0"
        names = {"a": "tiny model A (hello, qwen3)", "b": "tiny model B (random, llama)"}
    if model_b is not None:  # a real model for B (the streamed rows), e.g. SmolLM2-135M on the CPU
        b, names["b"] = model_b.resolve(), model_b.name
    text = f'''default_model = "a"
[[models]]
id = "a"
source = {{ type = "path", path = "{a}" }}
priority = 10
{common}
[[models]]
id = "b"
source = {{ type = "path", path = "{b}" }}
priority = 50
{common}
'''
    return text, names


async def run(args) -> dict:
    binary = find_llama_server()
    work = Path(tempfile.mkdtemp(prefix="peers-"))
    reg_text, names = make_models(work, args.gpu, args.model_b)
    (work / "models.toml").write_text(reg_text)
    specs = {s.id: s for s in parse_registry(reg_text).models}
    argvs = {}
    for mid, spec in specs.items():
        # the sidecar's own argument list, its slot-save directory included (slot_cache.py: on by default)
        (work / "slots" / mid).mkdir(parents=True, exist_ok=True)
        argv = build_argv(binary, spec, spec.source.path, None, Path("unused.sock"), None, work / "slots" / mid)
        i = argv.index("--host")  # the sidecar's children listen on a private socket; the peers on TCP (--port added)
        argvs[mid] = argv[:i] + ["--host", "127.0.0.1"] + argv[i + 2:]
    bare, sidecar, router = Bare(argvs), Sidecar(work / "models.toml", work, binary), Router(argvs, work, binary)
    peers = (bare, sidecar, router)
    res: dict = {"machine": machine(), "llama_server": str(binary), "binary_version": version(binary),
                 "models": names, "argv": {m: a[1:] for m, a in argvs.items()}, "reps": args.reps}
    rows: dict[str, dict[str, list[float]]] = {}

    def add(row: str, peer: str, value: float) -> None:
        rows.setdefault(row, {}).setdefault(peer, []).append(value)

    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4)) as http:
            await wait_http(http, sidecar.base + "/health", every=0.05)
            await wait_http(http, router.base + "/models", every=0.05)
            only = set(args.only.split(",")) if args.only else {"cold", "swap", "load", "latency", "stream", "status"}
            for p in peers:  # warm the page cache and the CUDA driver, unmeasured
                await p.cold_chat(http, "a")
                await p.unload_all(http)
            for rep in range(args.reps if only & {"cold", "swap", "load"} else 0):
                for p in peers if "cold" in only else ():
                    add("cold_chat_a_s", p.name, await timed(p.cold_chat(http, "a")))
                    await p.unload_all(http)
                for p in peers if "cold" in only else ():
                    add("cold_chat_b_s", p.name, await timed(p.cold_chat(http, "b")))
                    await p.unload_all(http)
                for p in peers if "swap" in only else ():
                    await p.cold_chat(http, "a")
                    add("swap_a_to_b_s", p.name, await timed(p.swap(http, "a", "b")))
                    await p.unload_all(http)
                for p in peers if "load" in only else ():
                    add("load_ready_a_s", p.name, await timed(p.load(http, "a")))
                    await p.unload_all(http)
                print(f"rep {rep + 1}/{args.reps}: {', '.join(sorted(only & {'cold', 'swap', 'load'}))} done", flush=True)
            if "latency" in only:
                await latency_rows(http, peers, args, add)
            if "stream" in only:
                await stream_rows(http, peers, args, add)
            if "status" in only:
                await status_rows(http, sidecar, router, args, res)
    finally:
        for p in peers:
            p.close()
    res["raw"] = rows
    res["sidecar_load_seconds"] = sidecar.load_seconds  # its own measure of the load rows (POST /models/load)
    res["sidecar_load_phases"] = sidecar.load_phases()  # every load's phases, from its log
    res["summary"] = {row: {peer: (statistics.median(v) if not row.startswith("chat_latency") else
                                   {"p50": pct(v, 50), "p99": pct(v, 99)}) for peer, v in by_peer.items()}
                      for row, by_peer in rows.items()}
    return res


def paired_ratio(raw: dict[str, list[float]]) -> float:
    """sidecar / bare of each interleaved rep, median: a drift of the machine between reps (bare itself moved by 10 %
    within a run on the H100) cancels out within a rep."""
    return statistics.median(s / b for s, b in zip(raw["sidecar"], raw["bare"]))


async def latency_rows(http, peers, args, add) -> None:
    # small chat latency, A loaded everywhere, requests interleaved
    for p in peers:
        await p.load(http, "a")
    for p in peers:
        for _ in range(20):
            await chat(http, p.url("a"), "a")
    for _ in range(args.requests):
        for p in peers:
            add("chat_latency_ms", p.name, 1000 * await timed(chat(http, p.url("a"), "a", max_tokens=1)))
    print("latency done", flush=True)
    for p in peers:
        await p.unload_all(http)


async def stream_rows(http, peers, args, add) -> None:
    # streamed generation, B loaded everywhere
    for p in peers:
        await p.load(http, "b")
        await stream_run(http, p.url("b"), "b", 32, 1)
    for _ in range(args.stream_reps):
        for streams in (1, 8):
            for p in peers:
                add(f"stream_tok_s_x{streams}", p.name, await stream_run(http, p.url("b"), "b", args.tokens, streams))
    print("streams done", flush=True)
    for p in peers:
        await p.unload_all(http)


async def status_rows(http, sidecar, router, args, res) -> None:
    """The sidecar's /models/status and the router's GET /models, B loaded in both, interleaved --status-reps
    times; the table shows the rep with the median throughput of each, the JSON every rep."""
    procs = args.status_procs or max(1, min(8, (os.cpu_count() or 2) // 2))
    for p in (sidecar, router):
        await p.load(http, "b")
    reps: dict[str, list[dict]] = {"sidecar": [], "router": []}
    for _ in range(args.status_reps):
        for url, peer in ((sidecar.base + "/models/status", sidecar), (router.base + "/models", router)):
            reps[peer.name].append(await asyncio.to_thread(status_load, url, args.status_clients, args.status_seconds,
                                                           procs, peer.proc.pid))
    for peer, runs in reps.items():
        res[f"status_{peer}"] = sorted(runs, key=lambda r: r["req_per_s"])[len(runs) // 2]
        res[f"status_{peer}_reps"] = runs
    res["status_client_processes"] = procs
    for p in (sidecar, router):
        await p.unload_all(http)


def machine() -> str:
    gpu = ""
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip().replace("\n", " + ")
    except (OSError, subprocess.TimeoutExpired):
        pass
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{gpu or 'no GPU'}; {os.cpu_count()} x {cpu or platform.processor()}"


def version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    return " ".join((out.stdout + out.stderr).split())[:120]


def table(res: dict) -> str:
    s = res["summary"]
    names = res["models"]

    def secs(row):
        return [f"{s[row][p]:.3f} s" for p in PEERS]

    def lat(p):
        v = s["chat_latency_ms"][p]
        return f"{v['p50']:.2f} / {v['p99']:.2f} ms"

    def ahead(row, lower_better=True):
        sc, ro = s[row]["sidecar"], s[row]["router"]
        return "yes" if (sc <= ro if lower_better else sc >= ro) else "NO"

    lines = [f"Machine: {res['machine']}; llama-server {res['binary_version']}; {res['reps']} interleaved reps "
             "(medians); latency over all requests.", "",
             "| measure | bare | sidecar | llama.cpp router | sidecar at or ahead of router |", "|---|---|---|---|---|"]
    if "cold_chat_a_s" in s:
        lines.append(f"| cold chat, {names['a']} | " + " | ".join(secs("cold_chat_a_s")) + f" | {ahead('cold_chat_a_s')} |")
        lines.append(f"| cold chat, {names['b']} | " + " | ".join(secs("cold_chat_b_s")) + f" | {ahead('cold_chat_b_s')} |")
    if "swap_a_to_b_s" in s:
        lines.append("| swap A -> B (request for B while A is loaded) | " + " | ".join(secs("swap_a_to_b_s"))
                     + f" | {ahead('swap_a_to_b_s')} |")
    if "load_ready_a_s" in s:
        lr = s["load_ready_a_s"]
        lines.append(f"| load -> ready, A (bare: exec -> /health 200) | " + " | ".join(secs("load_ready_a_s"))
                     + f" | {ahead('load_ready_a_s')} (sidecar - bare: {1000 * (lr['sidecar'] - lr['bare']):+.1f} ms) |")
    if "chat_latency_ms" in s:
        c = s["chat_latency_ms"]
        lines.append(f"| small chat latency p50 / p99 ({len(res['raw']['chat_latency_ms']['bare'])} sequential) | "
                     + " | ".join(lat(p) for p in PEERS)
                     + f" | {'yes' if c['sidecar']['p50'] <= c['router']['p50'] and c['sidecar']['p99'] <= c['router']['p99'] else 'NO'}"
                     f" (added over bare: p50 {c['sidecar']['p50'] - c['bare']['p50']:+.2f} ms, "
                     f"p99 {c['sidecar']['p99'] - c['bare']['p99']:+.2f} ms) |")
    for n in (1, 8) if "stream_tok_s_x1" in s else ():
        row = f"stream_tok_s_x{n}"
        lines.append(f"| streamed tok/s, {names['b']}, {n} stream{'s' if n > 1 else ''} | "
                     + " | ".join(f"{s[row][p]:.0f}" for p in PEERS)
                     + f" | {ahead(row, lower_better=False)} (sidecar/bare {s[row]['sidecar'] / s[row]['bare']:.3f}; "
                     f"median of the per-rep ratios {paired_ratio(res['raw'][row]):.3f}) |")
    if "status_sidecar" in res:
        ss, rs = res["status_sidecar"], res["status_router"]
        ok = ss["req_per_s"] >= rs["req_per_s"] and ss["p99_ms"] <= rs["p99_ms"]
        lines.append(f"| status, 200 concurrent clients: sidecar `/models/status` vs router `GET /models` | — | "
                     f"{ss['req_per_s']:.0f} req/s, p50 {ss['p50_ms']:.1f} ms, p99 {ss['p99_ms']:.1f} ms, "
                     f"{ss['cpu_us_per_req']:.0f} µs CPU/req | "
                     f"{rs['req_per_s']:.0f} req/s, p50 {rs['p50_ms']:.1f} ms, p99 {rs['p99_ms']:.1f} ms, "
                     f"{rs['cpu_us_per_req']:.0f} µs CPU/req | "
                     f"{'yes' if ok else 'NO'} (sidecar/router {ss['req_per_s'] / rs['req_per_s']:.2f}) |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="real-shape synthetic models on the GPU (else tiny, on the CPU)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--requests", type=int, default=300, help="sequential small chats per peer")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per streamed generation")
    ap.add_argument("--stream-reps", type=int, default=3)
    ap.add_argument("--status-clients", type=int, default=200)
    ap.add_argument("--status-seconds", type=float, default=10)
    ap.add_argument("--status-reps", type=int, default=1, help="interleaved status runs (the median is shown)")
    ap.add_argument("--model-b", type=Path, help="a GGUF file to use as model B instead of the generated one")
    ap.add_argument("--only", help="comma-separated rows: cold, swap, load, latency, stream, status")
    ap.add_argument("--status-procs", type=int, help="client processes for the status load (default: cores / 2, <= 8)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args()
    res = asyncio.run(run(args))
    md = table(res)
    print(md)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    if args.md:
        args.md.write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
