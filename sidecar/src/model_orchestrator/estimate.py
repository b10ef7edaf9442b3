"""How much GPU memory a llama-server process will take, from the GGUF header alone (the weights are never read).

    total = weights placed on the GPU + KV cache + compute buffer + mmproj + LoRA adapters + per-process CUDA overhead

Weights follow llama.cpp's placement: the last `n_gpu_layers` blocks go to the GPU, plus the output layer (norm and
lm_head) once n_gpu_layers > 0 counts it; the token embedding stays on the host, except that a tied lm_head is
copied to the GPU. Tensor overrides (`-ot REGEX=CPU`, `--cpu-moe`, `--n-cpu-moe N`) keep matching tensors on the host.
The KV cache is cells × (K + V bytes per cell) for each offloaded attention layer, with the cell count llama.cpp uses
(the context padded to 256; sliding-window layers keep only their window). The compute buffer and the per-process
overhead are fitted on a real GPU (CALIBRATION below; bench/vram_table.py measures them and says how).
A LoRA adapter's tensors (`<base tensor>.lora_a` / `.lora_b`) go where llama.cpp puts them: with their base tensor.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .gguf_header import GgufHeader
    from .model_files import ModelHeaders

from .llama_args import host_tensor_patterns

MIB = 1024 * 1024

# bytes per element of the KV cache types (block-quantized types store 32 elements in a block)
CACHE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
               "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32}

# Fitted on an NVIDIA H200 (CUDA 13.0, driver 580, llama.cpp b11434, -fa on, n_ubatch 512) from the buffer sizes
# llama.cpp logs and the NVML memory of the process, for three shapes x three contexts x two cache types
# (results/vram/run2-uncalibrated.json; bench/vram_table.py re-measures; how: results/vram/README.md):
# - compute buffer at zero context = n_ubatch x 4 B x (8 n_embd + 3 n_ff_active [+ n_expert_used n_embd for MoE])
#   (exact for all three shapes), + 2 KiB per context cell of which NVML sees 1 KiB resident (lazily mapped pool);
# - a quantized cache with flash attention converts K and V to f16 in the compute buffer: 4 B x n_embd_kv per
#   cell, minus ~24 MiB the f16 graph already had (the smallest offset seen: the estimate errs on the safe side);
# - per-process CUDA overhead (context, lazily loaded kernels): ~566 MiB dense, ~676 MiB MoE (more kernel kinds).
CALIBRATION = {
    "cuda_overhead_mib": 573.0,
    "cuda_overhead_moe_mib": 676.0,
    "compute_embd_floats": 8,
    "compute_ff_floats": 3,
    "compute_resident_bytes_per_cell_per_ubatch_token": 2.0,  # 1 KiB per cell at n_ubatch 512
    "quant_kv_bytes_per_cell_embd": 4.0,
    "quant_kv_offset_mib": 24.0,
    "output_bytes_per_vocab": 16.0,  # logits of 4 sequences, f32, in host-visible memory
}
# An RTX 5090 or another driver has another per-process overhead: MODEL_ORCHESTRATOR_CUDA_OVERHEAD_MB overrides it
# (bench/vram_table.py on that card tells the value), and admission keeps a safety margin on top.


@dataclass
class ModelShape:
    """What the estimate needs from a GGUF header."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: list[int]  # per layer (some models vary it; 0 marks a layer without attention)
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_vocab: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_swa: int  # sliding window (0: none)
    swa_layers: list[bool]
    tensors: dict[str, int]  # name -> bytes
    file_bytes: int

    @property
    def tied_output(self) -> bool:
        return "output.weight" not in self.tensors


@dataclass
class Estimate:
    weights_mb: float
    kv_cache_mb: float
    compute_mb: float
    mmproj_mb: float
    overhead_mb: float
    total_mb: float
    layers_on_gpu: int
    n_layer: int
    context_cells: int
    cache_type: str
    details: dict = field(default_factory=dict)
    lora_mb: float = 0.0  # the LoRA adapters' tensors placed on the GPU (with their base tensors)

    def to_dict(self) -> dict:
        return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def read_shape(path: Path) -> ModelShape:
    """What the estimate needs, from the header of a GGUF file on disk (cached per file version)."""
    from .gguf_header import read_header_cached

    return shape_from_header(read_header_cached(path), Path(path).stat().st_size)


def shape_from_header(h: "GgufHeader", file_bytes: int) -> ModelShape:
    """What the estimate needs, from a parsed GGUF header (read from disk or from the Hub: gguf_header.py)."""
    arch = h.fields.get("general.architecture")
    g = lambda key, default=None: h.fields.get(f"{arch}.{key}", default)  # noqa: E731
    n_layer = int(g("block_count"))
    if not 0 <= n_layer <= len(h.tensors):  # every block has tensors: lists of n_layer are built below
        raise ValueError(f"{arch}.block_count is {n_layer}, more than the file's {len(h.tensors)} tensors")
    n_embd = int(g("embedding_length"))
    n_head = g("attention.head_count")
    n_head = int(n_head if not isinstance(n_head, list) else max(n_head))
    kv = g("attention.head_count_kv", n_head)
    kv = [int(x) for x in kv] if isinstance(kv, list) else [int(kv)] * n_layer
    head_dim = n_embd // n_head if n_head else 0
    n_swa = int(g("attention.sliding_window", 0) or 0)
    pattern = g("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        swa_layers = [bool(x) for x in pattern]
    elif n_swa and isinstance(pattern, int) and pattern > 0:  # every pattern-th layer is global
        swa_layers = [(i + 1) % pattern != 0 for i in range(n_layer)]
    else:
        swa_layers = [bool(n_swa)] * n_layer
    tokens = h.fields.get("tokenizer.ggml.tokens")
    n_vocab = int(g("vocab_size", 0) or (tokens["len"] if isinstance(tokens, dict) else len(tokens or [])))
    n_ff = g("feed_forward_length", 0)
    n_ff = int(max(n_ff) if isinstance(n_ff, list) else n_ff)
    return ModelShape(
        arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=kv,
        head_dim_k=int(g("attention.key_length", head_dim)), head_dim_v=int(g("attention.value_length", head_dim)),
        n_ff=n_ff, n_vocab=n_vocab, n_expert=int(g("expert_count", 0) or 0),
        n_expert_used=int(g("expert_used_count", 0) or 0), n_ff_exp=int(g("expert_feed_forward_length", 0) or 0),
        n_swa=n_swa, swa_layers=swa_layers,
        tensors={t.name: t.n_bytes for t in h.tensors}, file_bytes=file_bytes,
    )


_BLOCK = re.compile(r"^blk\.(\d+)\.")


def estimate_shape(shape: ModelShape, *, n_ctx: int, n_gpu_layers: int, cache_type: str = "f16",
                   cache_type_v: str | None = None, flash_attn: bool = True, n_ubatch: int = 512,
                   extra_args: list[str] = (), mmproj_bytes: int = 0, kv_offload: bool = True,
                   overhead_mib: float | None = None, lora_tensors: dict[str, int] | None = None) -> Estimate:
    """`lora_tensors`: the adapters' tensors (name -> bytes), counted where their base tensor goes."""
    cal = CALIBRATION
    n_layer = shape.n_layer
    ngl = n_layer + 1 if n_gpu_layers < 0 else n_gpu_layers
    first_gpu_layer = max(n_layer + 1 - ngl, 0)  # llama.cpp: blocks il >= n_layer + 1 - ngl; the output layer is il = n_layer
    output_on_gpu = ngl >= 1
    on_gpu = [i >= first_gpu_layer for i in range(n_layer)]
    overrides = host_tensor_patterns(list(extra_args), n_layer)

    def placed_on_gpu(name: str) -> bool:
        if any(p.search(name) for p in overrides):
            return False
        m = _BLOCK.match(name)
        if m:
            return int(m.group(1)) < n_layer and on_gpu[int(m.group(1))]
        if name.startswith(("output.", "output_norm.")):
            return output_on_gpu
        # the tied lm_head is a GPU copy of the embedding
        return name.startswith("token_embd.") and shape.tied_output and output_on_gpu

    weights = sum(nbytes for name, nbytes in shape.tensors.items() if placed_on_gpu(name))
    lora = sum(nbytes for name, nbytes in (lora_tensors or {}).items()
               if placed_on_gpu(name.removesuffix(".lora_a").removesuffix(".lora_b")))
    cells = -(-n_ctx // 256) * 256
    ctype_v = cache_type_v or cache_type
    kv = 0.0
    for i in range(n_layer):
        if not (on_gpu[i] and kv_offload) or shape.n_head_kv[i] == 0:
            continue
        layer_cells = cells
        if shape.swa_layers[i] and shape.n_swa:
            layer_cells = min(cells, -(-(shape.n_swa + n_ubatch) // 256) * 256)
        kv += layer_cells * shape.n_head_kv[i] * (shape.head_dim_k * CACHE_BYTES[cache_type]
                                                  + shape.head_dim_v * CACHE_BYTES[ctype_v])
    n_embd_kv = max(shape.n_head_kv) * max(shape.head_dim_k, shape.head_dim_v)
    ff_active = shape.n_ff_exp * shape.n_expert_used if shape.n_expert else shape.n_ff
    any_gpu = ngl > 0
    compute = overhead = 0.0
    if any_gpu:
        floats = cal["compute_embd_floats"] * shape.n_embd + cal["compute_ff_floats"] * ff_active
        if shape.n_expert:
            floats += shape.n_expert_used * shape.n_embd  # the weighted outputs of the chosen experts
        compute = n_ubatch * 4 * floats
        compute += cells * n_ubatch * cal["compute_resident_bytes_per_cell_per_ubatch_token"] * (1 if flash_attn else shape.n_head)
        if flash_attn and (cache_type not in ("f16", "bf16") or ctype_v not in ("f16", "bf16")):
            compute += max(0.0, cells * n_embd_kv * cal["quant_kv_bytes_per_cell_embd"] - cal["quant_kv_offset_mib"] * MIB)
        compute += shape.n_vocab * cal["output_bytes_per_vocab"]
        overhead = (overhead_mib if overhead_mib is not None else
                    cal["cuda_overhead_moe_mib"] if shape.n_expert else cal["cuda_overhead_mib"]) * MIB
    total = weights + kv + compute + mmproj_bytes + lora + overhead
    return Estimate(
        weights_mb=weights / MIB, kv_cache_mb=kv / MIB, compute_mb=compute / MIB, mmproj_mb=mmproj_bytes / MIB,
        overhead_mb=overhead / MIB, total_mb=total / MIB, layers_on_gpu=sum(on_gpu) + (1 if output_on_gpu else 0),
        n_layer=n_layer, context_cells=cells, cache_type=cache_type if ctype_v == cache_type else f"{cache_type}/{ctype_v}",
        details={"arch": shape.arch, "file_mb": round(shape.file_bytes / MIB, 1), "n_ubatch": n_ubatch,
                 "flash_attn": flash_attn, "experts": shape.n_expert, "sliding_window": shape.n_swa},
        lora_mb=lora / MIB,
    )


def estimate_headers(headers: "ModelHeaders", **kwargs) -> Estimate:
    """The estimate of a model from its headers (model_files.read_headers: from disk, or from the Hub before any
    download); the one path every estimate takes."""
    mmproj_bytes = sum(t.n_bytes for t in headers.mmproj.tensors) if headers.mmproj else 0
    lora: dict[str, int] = {}  # two adapters of one tensor: both count
    for h in headers.lora:
        for t in h.tensors:
            lora[t.name] = lora.get(t.name, 0) + t.n_bytes
    est = estimate_shape(shape_from_header(headers.model, headers.model_bytes), mmproj_bytes=mmproj_bytes,
                         lora_tensors=lora, **kwargs)
    if headers.lora:
        est.details["lora_adapters"] = len(headers.lora)
    est.details["header_from"] = "disk" if headers.hub_bytes_read is None else "hub"
    if headers.hub_bytes_read is not None:
        est.details["hub_bytes_read"] = headers.hub_bytes_read  # 0: from the header cache
    return est


def estimate_file(model: Path, *, mmproj: Path | None = None, lora: list[Path] = (), **kwargs) -> Estimate:
    """The estimate of GGUF files on disk (`lora`: adapter files)."""
    from .gguf_header import read_header_cached
    from .model_files import ModelHeaders

    headers = ModelHeaders(read_header_cached(model), Path(model).stat().st_size,
                           read_header_cached(mmproj) if mmproj else None,
                           lora=[read_header_cached(p) for p in lora])
    return estimate_headers(headers, **kwargs)
