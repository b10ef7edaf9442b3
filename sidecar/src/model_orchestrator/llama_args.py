"""Everything this project knows about llama-server's command line, in one place: the argv built for a model, the
flags the orchestrator reserves for itself, the KV cache types, the LoRA adapters' flags, and what a model's
`extra_args` say (parallel slots, embeddings, tensors kept on the host).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .registry import ModelSpec

# The KV cache types llama-server accepts for -ctk/-ctv (estimate.CACHE_BYTES has a size for each).
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")

# Flags the orchestrator sets itself; letting extra_args set them would break routing, placement or readiness, or
# expose llama-server.
RESERVED_FLAGS = frozenset({
    "-m", "--model", "--host", "--port", "-a", "--alias", "--mmproj", "-mm", "-c", "--ctx-size",
    "-ngl", "--gpu-layers", "--n-gpu-layers", "-ctk", "--cache-type-k", "-ctv", "--cache-type-v",
    "--models-dir", "--models-preset", "--api-key", "--api-key-file", "--path", "-fit", "--fit",
    "--api-prefix", "--ssl-key-file", "--ssl-cert-file",  # /health and the proxy talk plain HTTP at the root
    "-dev", "--device", "-ts", "--tensor-split",  # placement is admission's (set split = true to allow splitting)
    "--slot-save-path",  # the slot cache's directory (slot_cache.py; per model: save_slots)
    "--lora", "--lora-scaled", "--lora-init-without-apply",  # the registry's `lora` (ids follow its order)
    "-n", "--predict", "--n-predict",  # the registry's `max_tokens`
})

DEFAULT_PARALLEL_SLOTS = 4  # llama-server's -np default (auto)


def reserved_flag(arg: str) -> str | None:
    """The reserved flag `arg` sets (`--port` or `--port=1`), or None."""
    flag = arg.split("=", 1)[0]
    return flag if flag in RESERVED_FLAGS else None


def lora_args(adapters: list[tuple[Path, float]]) -> list[str]:
    """One `--lora-scaled FNAME:SCALE` per adapter, in order: llama-server numbers them 0, 1, ... as given (the ids
    of its /lora-adapters and of a request's `lora`). A comma in a path is quoted (llama-server reads the value as
    CSV); a colon cannot be passed at all (the registry refuses such paths)."""
    out = []
    for path, scale in adapters:
        p = str(path)
        if ":" in p:
            raise ValueError(f"LoRA adapter path {p!r} contains ':', which llama-server's --lora-scaled cannot take")
        if "," in p or p.startswith('"'):
            p = '"' + p.replace('"', '""') + '"'
        out += ["--lora-scaled", f"{p}:{scale:g}"]
    return out


def build_argv(binary: Path, spec: "ModelSpec", model: Path, mmproj: Path | None, port: int,
               tensor_split: list[float] | None = None, slot_save_path: Path | None = None,
               lora: list[tuple[Path, float]] = ()) -> list[str]:
    """The command line for one model: loopback only, its own port, exactly the context and layers the estimate
    assumed (`--fit off`: llama-server's own fitting would silently change them). Which GPUs it sees is set by
    CUDA_VISIBLE_DEVICES (lifecycle.placement_env); a split over several gets their shares here. `lora`: the
    adapters' files with the scales to start with."""
    argv = [
        str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--alias", spec.id,
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
