#!/bin/sh
# Download a model of the registry into the shared Hugging Face cache (HF_HOME, the compose volume hf-cache).
#
#   ./llama-cpp-service/download-model.sh [--local|--docker] [--no-verify] [MODEL]    (MODEL: qwen3-vl-30b)
#
# It runs the sidecar's `model-orchestrator pull MODEL` (into huggingface-hub's cache layout):
#   - nothing is downloaded when the files are already in the cache (one metadata request per file);
#   - a dropped connection is resumed from the last byte written (HTTP Range, up to 5 times a file), and an
#     interrupted pull (Ctrl-C, a restart) resumes the next time;
#   - progress bars on a terminal;
#   - checks: the size the Hub announced and its SHA-256 (the sidecar), the GGUF magic (the sidecar), and here the SHA-256 of
#     each file against the Hub's (the blob's name in the cache is the LFS SHA-256); --no-verify skips the hashing
#     (about 10-20 s for the 20 GB of qwen3-vl-30b).
#
# Where it runs:
#   --docker  (default on a host with `docker compose`): inside the llama-cpp container, so the files land in the
#             hf-cache volume with the container user's ownership: `docker compose exec` when the service runs,
#             else a one-off `docker compose run --rm --no-deps`.
#   --local   (default inside the container, or without docker): here, with HF_HOME as set (default
#             ~/.cache/huggingface) and the model-orchestrator found in $MODEL_ORCHESTRATOR_BIN, on PATH, or in the
#             repository's .venv.
# HF_ENDPOINT selects a mirror, HF_TOKEN a token (gated repos); MODEL_ORCHESTRATOR_MODELS the registry.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
mode=""
verify=1
model=""
while [ $# -gt 0 ]; do
    case "$1" in
        --local) mode=local ;;
        --docker) mode=docker ;;
        --no-verify) verify=0 ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "download-model.sh: unknown option $1" >&2; exit 2 ;;
        *) model="$1" ;;
    esac
    shift
done
model=${model:-${MODEL:-qwen3-vl-30b}}

if [ -z "$mode" ]; then
    if [ -f /.dockerenv ] || [ -f /run/.containerenv ]; then
        mode=local
    elif command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1 && [ -f "$here/../compose.yml" ]; then
        mode=docker
    else
        mode=local
    fi
fi

if [ "$mode" = docker ]; then
    compose="docker compose -f $here/../compose.yml"
    flags=""
    [ "$verify" = 1 ] || flags="--no-verify"
    tty=""
    [ -t 0 ] && [ -t 1 ] || tty="-T"
    if [ -n "$($compose ps --status running -q llama-cpp 2>/dev/null)" ]; then
        # shellcheck disable=SC2086
        exec $compose exec $tty llama-cpp download-model.sh --local $flags "$model"
    fi
    # shellcheck disable=SC2086
    exec $compose run --rm --no-deps $tty --entrypoint download-model.sh llama-cpp --local $flags "$model"
fi

# ---- local ----
mo=${MODEL_ORCHESTRATOR_BIN:-}
if [ -z "$mo" ]; then
    if command -v model-orchestrator >/dev/null 2>&1; then
        mo=model-orchestrator
    elif [ -x "$here/../.venv/bin/model-orchestrator" ]; then
        mo="$here/../.venv/bin/model-orchestrator"
    else
        echo "download-model.sh: model-orchestrator not found (make deps, or set MODEL_ORCHESTRATOR_BIN)" >&2
        exit 2
    fi
fi

echo "pulling $model into ${HF_HOME:-~/.cache/huggingface} from ${HF_ENDPOINT:-https://huggingface.co}" >&2
paths=$("$mo" pull "$model") || { echo "download-model.sh: pull of $model failed" >&2; exit 1; }

status=0
for p in $paths; do
    blob=$(readlink -f "$p")
    size=$(wc -c < "$blob" | tr -d ' ')
    name=$(basename "$blob")
    if [ "$verify" = 1 ] && printf '%s' "$name" | grep -Eq '^[0-9a-f]{64}$'; then
        sum=$(sha256sum "$blob" | cut -d' ' -f1)
        if [ "$sum" = "$name" ]; then
            echo "ok  $p ($size bytes, sha256 $sum)" >&2
        else
            echo "BAD $p: sha256 $sum, the Hub says $name; delete $blob and run this again" >&2
            status=1
        fi
    else
        echo "ok  $p ($size bytes)" >&2
    fi
done
[ "$status" = 0 ] && echo "$paths"
exit "$status"
