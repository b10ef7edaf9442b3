#!/usr/bin/env bash
# The hot-path runs on the GPU device (issue 12). Inputs in $DEV (default .device/hotpath): whl/ (wheels missing
# there), bin/lscuda.part* (the CUDA llama-server built there by install-llama-server, xz tar split in 15 MB parts:
# the device returns files of at most 16 MB), repo/ (this tree; REPO=$PWD runs the checkout itself).
# Steps: peers-gpu | peers-cpu | tests | two-gpus | kv-restore | calibration (issue 13).
# Everything lands in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
DEV=${DEV:-$PWD/.device/hotpath}; REPO=${REPO:-$DEV/repo}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ ! -x /tmp/moc/llama-server/b11434-cuda-90/llama-server ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$DEV"/whl/*.whl || exit 1
  mkdir -p /tmp/moc/llama-server/b11434-cuda-90 && cat "$DEV"/bin/lscuda.part* | xz -dc | tar -x -C /tmp/moc/llama-server/b11434-cuda-90 || exit 1
fi
export PYTHONPATH=/tmp/site:$REPO/sidecar/src MODEL_ORCHESTRATOR_CACHE=/tmp/moc
export LLAMA_SERVER_BIN=/tmp/moc/llama-server/b11434-cuda-90/llama-server
cd "$REPO"
for step in "$@"; do
  case $step in
    peers-gpu) python3 bench/peers.py --gpu ${PEERS_GPU_ARGS:-} --json "$OUT/peers-h100.json" --md "$OUT/peers-h100.md" 2>&1 | tail -40 ;;
    peers-cpu) CUDA_VISIBLE_DEVICES="" python3 bench/peers.py ${PEERS_CPU_ARGS:-} --json "$OUT/peers-cpu.json" --md "$OUT/peers-cpu.md" 2>&1 | tail -30 ;;
    tests) python3 -m pytest -q -p no:cacheprovider --timeout 300 tests/test_hotpath.py tests/test_gpu.py 2>&1 | tee "$OUT/tests-h100.log" | tail -15 ;;
    kv-restore) python3 bench/kv_restore.py ${KV_ARGS:-} --json "$OUT/kv-restore-h100.json" 2>&1 | tail -12 ;;
    calibration) python3 -m pytest -v -s -m gpu -p no:cacheprovider --timeout 500 tests/test_calibration.py 2>&1 | tee "$OUT/calibration-h100.log" | tail -12 ;;
    two-gpus) TWO_GPU_RESULTS="$OUT/two-gpus.json" python3 -m pytest -v -s -p no:cacheprovider --timeout 500 tests/test_two_gpus.py tests/test_gpu.py 2>&1 | tee "$OUT/two-gpus.log" | tail -25 ;;
  esac
done
