"""Everything this project knows about llama-server's command line, in one place: the argv built for a model (on a
private Unix socket, its key in the environment, no CORS grant), the flags the orchestrator reserves for itself and
why, the KV cache types, the LoRA adapters' flags, and what a model's `extra_args` say (parallel slots, embeddings,
tensors kept on the host). It sits below the registry (registry.py validates with it; `LaunchSpec` is what a model
entry gives it).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

# The KV cache types llama-server accepts for -ctk/-ctv (gguf_header.element_bytes gives each one's size).
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")

# Flags the orchestrator sets itself, each with why (registry.py names it when extra_args carries one): letting
# extra_args set them would break routing, placement or readiness, or open llama-server to others.
_OWN_FIELD = "use the model's own field in the registry instead"
_PRIVATE = ("each llama-server listens only on a private Unix socket of the sidecar, with a secret key of its own "
            "made at every launch; nothing else can reach it, so protect the sidecar instead "
            "(MODEL_ORCHESTRATOR_API_KEY)")
RESERVED_FLAGS: dict[str, str] = {
    **dict.fromkeys(("-m", "--model", "-a", "--alias", "--mmproj", "-mm", "-c", "--ctx-size", "-ngl", "--gpu-layers",
                     "--n-gpu-layers", "-ctk", "--cache-type-k", "-ctv", "--cache-type-v", "-fit", "--fit"),
                    _OWN_FIELD),
    **dict.fromkeys(("--host", "--port", "--api-key", "--api-key-file", "--cors-origins", "--cors-credentials",
                     "--no-cors-credentials"), _PRIVATE),
    **dict.fromkeys(("--models-dir", "--models-preset"), "the sidecar runs one model per llama-server (router mode "
                    "would bypass admission)"),
    **dict.fromkeys(("--path", "--api-prefix", "--ssl-key-file", "--ssl-cert-file"), "readiness and the proxy talk "
                    "plain HTTP to llama-server's own routes at the root"),
    **dict.fromkeys(("-dev", "--device", "-ts", "--tensor-split"), "placement is admission's (set split = true in the "
                    "registry to allow splitting a model over GPUs)"),
    "--slot-save-path": "the slot cache's directory (slot_cache.py; per model: save_slots)",
    **dict.fromkeys(("--lora", "--lora-scaled", "--lora-init-without-apply"), "use the registry's `lora` (ids follow "
                    "its order)"),
    **dict.fromkeys(("-n", "--predict", "--n-predict"), "use the registry's `max_tokens` (a request's own limit wins)"),
}

# How the sidecar reaches a child, and nobody else does (lifecycle.LlamaServer.request is the one caller):
API_KEY_ENV = "LLAMA_API_KEY"  # llama-server reads --api-key from it: the key never shows in argv (`ps` shows argv)
NO_CORS_ORIGIN = "none"  # llama-server sends it as Access-Control-Allow-Origin: no page's origin serialises to it

DEFAULT_PARALLEL_SLOTS = 4  # llama-server's -np default (auto)


def reserved_flag(arg: str) -> str | None:
    """The reserved flag `arg` sets (`--port` or `--port=1`), or None (RESERVED_FLAGS[flag] says why)."""
    flag = arg.split("=", 1)[0]
    return flag if flag in RESERVED_FLAGS else None


def _csv_value(value: str) -> str:
    """A value as llama-server's CSV-reading flags (--host, --lora-scaled) take it: quoted if it holds a comma."""
    if "," in value or value.startswith('"'):
        return '"' + value.replace('"', '""') + '"'
    return value


def lora_args(adapters: list[tuple[Path, float]]) -> list[str]:
    """One `--lora-scaled FNAME:SCALE` per adapter, in order: llama-server numbers them 0, 1, ... as given (the ids
    of its /lora-adapters and of a request's `lora`). A comma in a path is quoted (llama-server reads the value as
    CSV); a colon cannot be passed at all (the registry refuses such paths)."""
    out = []
    for path, scale in adapters:
        p = str(path)
        if ":" in p:
            raise ValueError(f"LoRA adapter path {p!r} contains ':', which llama-server's --lora-scaled cannot take")
        out += ["--lora-scaled", f"{_csv_value(p)}:{scale:g}"]
    return out


class LaunchSpec(Protocol):
    """The fields of a model entry (registry.ModelSpec) that its command line is built from."""

    id: str
    context_size: int
    n_gpu_layers: int
    cache_type: str
    flash_attn: str
    max_tokens: int
    extra_args: list[str]


def build_argv(binary: Path, spec: LaunchSpec, model: Path, mmproj: Path | None, socket: Path,
               tensor_split: list[float] | None = None, slot_save_path: Path | None = None,
               lora: list[tuple[Path, float]] = ()) -> list[str]:
    """The command line for one model: listening only on `socket` (a Unix socket path ending in .sock: no TCP port),
    granting no web page cross-origin access, exactly the context and layers the estimate assumed (`--fit off`:
    llama-server's own fitting would silently change them). Its key comes from the environment (API_KEY_ENV). Which
    GPUs it sees is set by CUDA_VISIBLE_DEVICES (lifecycle.placement_env); a split over several gets their shares
    here. `lora`: the adapters' files with the scales to start with."""
    argv = [
        str(binary), "-m", str(model), "--host", _csv_value(str(socket)), "--cors-origins", NO_CORS_ORIGIN,
        "--no-cors-credentials", "--alias", spec.id,
        "-c", str(spec.context_size), "-ngl", str(spec.n_gpu_layers), "-ctk", spec.cache_type, "-ctv", spec.cache_type,
        "-fa", spec.flash_attn, "--fit", "off", "--metrics", "--jinja",
    ]
    if spec.max_tokens != -1:  # the default of requests that name no limit; theirs wins
        argv += ["--n-predict", str(spec.max_tokens)]
    if mmproj:
        argv += ["--mmproj", str(mmproj)]
    if tensor_split:
        argv += ["--split-mode", "layer", "--tensor-split", ",".join(f"{x:g}" for x in tensor_split)]
    if slot_save_path:
        argv += ["--slot-save-path", str(slot_save_path)]
    argv += lora_args(list(lora))
    return argv + list(spec.extra_args)


def _values(extra_args: list[str], *flags: str) -> list[str]:
    """The values given to any of `flags` (`-np 2`, `--parallel=2`), in order."""
    out = []
    for i, arg in enumerate(extra_args):
        flag, eq, inline = arg.partition("=")
        if flag in flags:
            if eq:
                out.append(inline)
            elif i + 1 < len(extra_args):
                out.append(extra_args[i + 1])
    return out


def parallel_slots(extra_args: list[str]) -> int:
    """llama-server's -np/--parallel from a model's extra_args; its default (auto) is 4 slots."""
    for value in reversed(_values(extra_args, "-np", "--parallel")):
        if value.isdigit() and int(value) > 0:
            return int(value)
    return DEFAULT_PARALLEL_SLOTS


def serves_embeddings(extra_args: list[str]) -> bool:
    return any(a in ("--embedding", "--embeddings") for a in extra_args)


EXPERT_TENSORS = re.compile(r"ffn_(up|down|gate)_exps")


def host_tensor_patterns(extra_args: list[str], n_layer: int) -> list[re.Pattern]:
    """Tensor name patterns that extra_args keep in host memory (-ot ...=CPU, --cpu-moe, --n-cpu-moe N)."""
    pats: list[re.Pattern] = []
    for value in _values(extra_args, "-ot", "--override-tensor"):
        for rule in value.split(","):
            pat, _, buft = rule.rpartition("=")
            if pat and buft.upper().startswith("CPU"):
                pats.append(re.compile(pat))
    if any(a in ("-cmoe", "--cpu-moe") for a in extra_args):
        pats.append(EXPERT_TENSORS)
    for value in _values(extra_args, "-ncmoe", "--n-cpu-moe"):
        if value.isdigit():
            n = min(int(value), n_layer)
            pats.append(re.compile(rf"^blk\.({'|'.join(str(j) for j in range(n))})\.ffn_(up|down|gate)_exps"))
    return pats
