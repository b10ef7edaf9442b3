#!/usr/bin/env python3
"""The VRAM table: the estimator's prediction vs the NVML-measured memory of the llama-server process.

For each shape (bench/synthetic_gguf.py: real architectures, zero Q4_0 weights) x context x KV cache type, this
starts llama-server with the command line the sidecar would use, waits until it is ready, reads the process's GPU
memory from NVML, reads llama.cpp's own buffer sizes and its projection (`common_params_fit`) from the log, stops
it, and compares. Needs a GPU and a CUDA llama-server (LLAMA_SERVER_BIN or the cached build).

  bench/vram_table.py --models-dir /tmp/m --json results/vram/table.json --md results/vram/table.md
Exits 1 when a row misses the target (within 0.5 % or 32 MiB of NVML). How estimate.py's constants follow from
llama.cpp's logged buffers: the comment above its CALIBRATION (tests/test_estimate.py replays results/vram/).
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_gguf import SHAPES, write_synthetic  # noqa: E402

from model_orchestrator.files.estimate import estimate_shape, shape_from_header  # noqa: E402
from model_orchestrator.files.gguf_header import read_header  # noqa: E402
from model_orchestrator.files.install import find_llama_server  # noqa: E402
from model_orchestrator.files.llama_args import build_argv  # noqa: E402
from model_orchestrator.files.registry import parse_registry  # noqa: E402

BUFFER = re.compile(r"(\w+)\s+(model|KV|compute|output|RS) buffer size =\s+([\d.]+) MiB")
PROJECTED = re.compile(r"projected to use (\d+) MiB of device memory vs\. (\d+) MiB")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nvml_process_mib(nvml, pid: int) -> int:
    total = 0
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        for p in nvml.nvmlDeviceGetComputeRunningProcesses(h):
            if p.pid == pid and p.usedGpuMemory is not None:
                total += p.usedGpuMemory // (1024 * 1024)
    return total


def measure(binary: Path, model: Path, ctx: int, cache: str, nvml, fit_projection: bool) -> dict:
    spec = parse_registry(f'default_model = "m"\n[[models]]\nid = "m"\nsource = {{ type = "path", path = "{model}" }}\n'
                          f'context_size = {ctx}\nn_gpu_layers = 99\ncache_type = "{cache}"\nflash_attn = "on"\n').models[0]
    port = free_port()
    argv = build_argv(binary, spec, model, None, Path("unused.sock")) + ["-lv", "4"]
    argv[argv.index("--host") + 1:argv.index("--host") + 2] = ["127.0.0.1", "--port", str(port)]  # bare: on TCP
    if fit_projection:  # let llama.cpp print its own projection (our -c and -ngl are explicit, so it changes nothing)
        argv[argv.index("--fit") + 1] = "on"
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited {proc.returncode}: {proc.stdout.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.02)
        ready_s = time.perf_counter() - t0
        # one real request: the first decode can allocate what the reserve pass did not
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                                      headers={"Content-Type": "application/json"}), timeout=60).read()
        time.sleep(0.5)
        measured = nvml_process_mib(nvml, proc.pid)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    buffers: dict[str, float] = {}
    for dev, kind, mib in BUFFER.findall(out):
        if dev.startswith("CUDA"):
            buffers[kind] = buffers.get(kind, 0.0) + float(mib)
    proj = PROJECTED.findall(out)
    return {"measured_mib": measured, "ready_s": round(ready_s, 2), "llama_buffers_mib": buffers,
            "llama_projection_mib": int(proj[0][0]) if proj else None,
            "log_memory": [l for l in out.splitlines() if "MiB" in l][:40]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--models-dir", type=Path, required=True)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ctx", default="8192,32768,131072")
    ap.add_argument("--cache", default="f16,q8_0")
    ap.add_argument("--no-projection", action="store_true", help="skip llama.cpp's own projection (--fit on)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args()
    import pynvml

    pynvml.nvmlInit()
    gpu = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
    binary = find_llama_server()
    args.models_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in args.shapes.split(","):
        path = args.models_dir / f"{shape}.gguf"
        if not path.exists():
            write_synthetic(path, shape)
        header = shape_from_header(read_header(path))
        for ctx in map(int, args.ctx.split(",")):
            for cache in args.cache.split(","):
                m = measure(binary, path, ctx, cache, pynvml, not args.no_projection)
                est = estimate_shape(header, n_ctx=ctx, n_gpu_layers=99, cache_type=cache, flash_attn=True)
                row = {"shape": shape, "ctx": ctx, "cache": cache, **m, "estimate": est.to_dict()}
                row["error_pct"] = round(100 * (est.total_mb - m["measured_mib"]) / m["measured_mib"], 2)
                row["error_mib"] = round(est.total_mb - m["measured_mib"], 1)
                if m["llama_projection_mib"]:
                    row["llama_error_pct"] = round(100 * (m["llama_projection_mib"] - m["measured_mib"]) / m["measured_mib"], 2)
                rows.append(row)
                print(f"{shape:14} {ctx:>7} {cache:5} measured {m['measured_mib']:>6} MiB  estimate {est.total_mb:>8.0f}"
                      f"  ({row['error_pct']:+.2f} %)  llama.cpp {m['llama_projection_mib']}  buffers {m['llama_buffers_mib']}",
                      flush=True)
    lines = [f"GPU: {gpu}; llama-server {binary}; -ngl 99 -fa on; weights Q4_0 (synthetic, real shapes)", "",
             "| shape | context | KV cache | NVML measured MiB | estimate MiB | error | llama.cpp projection MiB | its error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['ctx']} | {r['cache']} | {r['measured_mib']} | {r['estimate']['total_mb']:.0f} | "
                     f"{r['error_pct']:+.2f} % | {r['llama_projection_mib'] or '-'} | "
                     f"{str(r.get('llama_error_pct', '-')) + ' %' if r.get('llama_error_pct') is not None else '-'} |")
    worst = max(abs(r["error_pct"]) for r in rows)
    missed = [r for r in rows if abs(r["error_mib"]) > max(32.0, 0.005 * r["measured_mib"])]
    lines += ["", f"worst estimate error: {worst:.2f} %, {max(abs(r['error_mib']) for r in rows):.0f} MiB "
              f"(target: within 0.5 % or 32 MiB); rows beyond it: {len(missed)}"]
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"gpu": gpu, "rows": rows}, indent=2))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text("\n".join(lines) + "\n")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
