#!/usr/bin/env python3
"""What "will it fit?" costs before a download: the GGUF header of a Hub model read with HTTP range requests
(hub.read_remote_header), for the synthetic real-shape models (bench/synthetic_gguf.py: real vocabularies, sparse
weights) served by a local server speaking the Hub's file protocol (tests/support/hf_mirror.py).

Prints, per shape: the file size, where its header ends, the bytes and range requests fetched, the share of the
file, and the time of the first read and of a second one (answered from the header cache after one HEAD).

  bench/hub_header.py [--shapes llama-1b llama-8b qwen3-30b-a3b] [--dir /tmp/hub-bench]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["llama-1b", "llama-8b", "qwen3-30b-a3b"])
    p.add_argument("--dir", type=Path, help="where the sparse models and the header cache go (default: a temp dir)")
    args = p.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="hub-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    from support.hf_mirror import HfMirror
    from synthetic_gguf import write_synthetic

    files = {s: write_synthetic(work / f"{s}.gguf", s) for s in args.shapes}
    mirror = HfMirror({f"bench/{s}": {"model.gguf": path} for s, path in files.items()}).start()
    os.environ["HF_ENDPOINT"] = mirror.url  # read by huggingface_hub at import
    from model_orchestrator.files.hub import read_remote_header

    print(f"{'shape':<15}{'file GB':>9}{'header MB':>11}{'read MB':>9}{'ranges':>8}{'% of file':>11}"
          f"{'first ms':>10}{'cached ms':>11}")
    for shape, path in files.items():
        repo = f"bench/{shape}"
        before = len(mirror.file_gets())
        t0 = time.perf_counter()
        first = read_remote_header(repo, "model.gguf", "main", work / "header-cache")
        t1 = time.perf_counter()
        again = read_remote_header(repo, "model.gguf", "main", work / "header-cache")
        t2 = time.perf_counter()
        assert again.read_bytes == 0
        ranges = len(mirror.file_gets()) - before
        size = path.stat().st_size
        print(f"{shape:<15}{size / 1e9:>9.1f}{first.header.header_bytes / 1e6:>11.2f}{first.read_bytes / 1e6:>9.2f}"
              f"{ranges:>8}{100 * first.read_bytes / size:>10.3f}%{(t1 - t0) * 1e3:>10.0f}{(t2 - t1) * 1e3:>11.0f}")
    mirror.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
