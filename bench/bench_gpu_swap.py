#!/usr/bin/env python3
"""GPU benchmark (issue 3): cold start of the 30B-A3B shape through the sidecar vs a bare llama-server, and a swap
A -> B (load B with A evicted to make room) vs a bare start of B. Target: swap <= bare start of B + 100 ms.
Needs a GPU and a CUDA llama-server. Usage: bench/bench_gpu_swap.py [--runs 3] [--json OUT]"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_sidecar import free_port  # noqa: E402
from synthetic_gguf import write_synthetic  # noqa: E402

from model_orchestrator.files.install import find_llama_server  # noqa: E402
from model_orchestrator.files.llama_args import build_argv  # noqa: E402
from model_orchestrator.files.registry import parse_registry  # noqa: E402


def call(base: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(base + path, method=method, headers={"Content-Type": "application/json"},
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def bare_start_ms(binary: Path, spec, model: Path) -> float:
    port = free_port()
    argv = build_argv(binary, spec, model, None, Path("unused.sock"))
    argv[argv.index("--host") + 1:argv.index("--host") + 2] = ["127.0.0.1", "--port", str(port)]  # bare: on TCP
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        return (time.perf_counter() - t0) * 1000
            except OSError:
                time.sleep(0.001)
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="swap-"))
    a, b = write_synthetic(work / "a.gguf", "qwen3-30b-a3b"), write_synthetic(work / "b.gguf", "llama-8b")
    reg_text = f'''default_model = "a"
[[models]]
id = "a"
source = {{ type = "path", path = "{a}" }}
context_size = 8192
flash_attn = "on"
[[models]]
id = "b"
source = {{ type = "path", path = "{b}" }}
context_size = 8192
flash_attn = "on"
'''
    (work / "models.toml").write_text(reg_text)
    specs = {s.id: s for s in parse_registry(reg_text).models}
    binary = find_llama_server()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MODEL_ORCHESTRATOR_MODELS": str(work / "models.toml"), "MODEL_ORCHESTRATOR_PORT": str(port),
           "MODEL_ORCHESTRATOR_STATE": str(work / "state"), "LLAMA_SERVER_BIN": str(binary),
           "MODEL_ORCHESTRATOR_LOG_LEVEL": "WARNING"}
    sidecar = subprocess.Popen([sys.executable, "-m", "model_orchestrator", "serve"], env=env)
    res: dict = {}
    try:
        for _ in range(300):
            try:
                call(base, "GET", "/health")
                break
            except OSError:
                time.sleep(0.05)
        bare_a = [bare_start_ms(binary, specs["a"], a) for _ in range(args.runs)]
        cold_a = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            s, body = call(base, "POST", "/models/load", {"model": "a"})
            assert s == 200, body
            cold_a.append((time.perf_counter() - t0) * 1000)
            call(base, "POST", "/models/unload", {"model": "a"})
        bare_b = [bare_start_ms(binary, specs["b"], b) for _ in range(args.runs)]
        # leave room for one of the two only, so loading B must evict A
        _, st = call(base, "GET", "/models/status")
        _, ea = call(base, "POST", "/models/estimate", {"model": "a"})
        room = st["gpus"][0]["available_mb"]
        s, r = call(base, "POST", "/reservations", {"service": "bench-squeeze", "vram_mb": room - ea["estimate"]["total_mb"] - 1000})
        assert s == 201, r
        swap = []
        for _ in range(args.runs):
            s, body = call(base, "POST", "/models/load", {"model": "a", "allow_eviction": True})
            assert s == 200, body
            t0 = time.perf_counter()
            s, body = call(base, "POST", "/models/load", {"model": "b", "allow_eviction": True})
            swap.append((time.perf_counter() - t0) * 1000)
            assert s == 200 and body["evicted"] == ["a"], body
        res = {"bare_start_a_ms": statistics.median(bare_a), "sidecar_cold_start_a_ms": statistics.median(cold_a),
               "bare_start_b_ms": statistics.median(bare_b), "swap_a_to_b_ms": statistics.median(swap),
               "runs": args.runs, "raw": {"bare_a": bare_a, "cold_a": cold_a, "bare_b": bare_b, "swap": swap}}
    finally:
        sidecar.terminate()
        sidecar.wait(60)
    print("| measure | bare llama-server | through the sidecar | difference | target |")
    print("|---|---|---|---|---|")
    print(f"| cold start, Qwen3-30B-A3B shape (16 GiB, 8K) | {res['bare_start_a_ms']:.0f} ms | {res['sidecar_cold_start_a_ms']:.0f} ms | "
          f"{res['sidecar_cold_start_a_ms'] - res['bare_start_a_ms']:+.0f} ms | |")
    print(f"| swap 30B-A3B -> 8B (evict A, load B) vs bare start of B | {res['bare_start_b_ms']:.0f} ms | {res['swap_a_to_b_ms']:.0f} ms | "
          f"{res['swap_a_to_b_ms'] - res['bare_start_b_ms']:+.0f} ms | <= +100 ms |")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
