"""How much GPU memory a llama-server process will take, computed from parsed GGUF headers (gguf_header.ModelHeaders;
this module reads no file, and the weights are never read).

    total = weights placed on the GPU + KV cache + compute buffer + mmproj + LoRA adapters + per-process CUDA overhead

Weights follow llama.cpp's placement: the last `n_gpu_layers` blocks go to the GPU, plus the output layer (norm and
lm_head) once n_gpu_layers > 0 counts it; the token embedding stays on the host, except that a tied lm_head is
copied to the GPU. Tensor overrides (`-ot REGEX=CPU`, `--cpu-moe`, `--n-cpu-moe N`) keep matching tensors on the host.
The KV cache is cells × (K + V bytes per cell) for each offloaded attention layer (bytes per element:
gguf_header.element_bytes), with the cell count llama.cpp uses (the context padded to 256; sliding-window layers keep
only their window). The compute buffer and the per-process
overhead are fitted on a real GPU (CALIBRATION below; bench/vram_table.py measures them and says how).
A LoRA adapter's tensors (`<base tensor>.lora_a` / `.lora_b`) go where llama.cpp puts them: with their base tensor.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from .gguf_header import GgufHeader, ModelHeaders, element_bytes
from .llama_args import host_tensor_patterns

MIB = 1024 * 1024

# The compute buffer follows llama.cpp b11434's graph reservation (sched_reserve, a batch of n_ubatch tokens) on the
# GPU; only the CUDA0 buffer counts (the CUDA_Host one is pinned host memory). Checked against the buffers llama.cpp
# logs on an NVIDIA H200 (CUDA 13.0, driver 580, -fa on, n_ubatch 512) for three shapes x five contexts x f16, q8_0,
# q4_0 (results/vram/*.json; tests/test_estimate.py replays them; bench/vram_table.py re-measures):
#   compute = max(FFN peak, attention peak) + KQ mask
# - FFN peak: n_ubatch x 4 B x (4 n_embd + 3 n_ff_active [+ n_expert_used n_embd for MoE]), exact for all three;
# - attention peak, only with flash attention and a quantized K or V: the CUDA kernel for a batch (MMA/tile) converts
#   the quantized K and V to f16 into room allocated with its output tensor (ggml-cuda.cu get_alloc_size ->
#   ggml_cuda_flash_attn_ext_get_f16_extra_data): cells x 2 B x (n_embd_k_gqa if K is quantized + n_embd_v_gqa if V
#   is), above what is live there: n_ubatch x 4 B x (4 n_embd + n_q [+ n_expert_used n_embd for MoE]) (exact for the
#   dense shapes, 4 MiB short for the MoE). The f16 copies only replace the FFN peak when they are the larger: adding
#   them to it (as before) made a quantized cache 20 to 66 MiB high;
# - KQ mask: cells x n_ubatch x 2 B (f16 with flash attention; without it, f32 and the KQ matrix of every head);
# - MoE: the expert matmuls' scratch in CUDA's memory pool, which NVML sees and no buffer logs (~102 MiB for
#   Qwen3-30B-A3B's shape);
# - per-process CUDA overhead (context, kernels): what NVML sees beyond the buffers, 591-593 MiB for every shape.
CALIBRATION = {
    "cuda_overhead_mib": 592.0,
    "compute_embd_floats": 4,
    "compute_ff_floats": 3,
    "attention_embd_floats": 4,
    "moe_pool_mib": 102.0,
}
ESTIMATOR_VERSION = 2  # calibration.py forgets overheads learned from another version's estimates
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


def shape_from_header(h: GgufHeader) -> ModelShape:
    """What the estimate needs, from a parsed GGUF header (read from disk or from the Hub)."""
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
        tensors={t.name: t.n_bytes for t in h.tensors}, file_bytes=h.file_bytes,
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
    first_gpu_layer = max(n_layer + 1 - ngl, 0)  # llama.cpp: blocks il >= n_layer + 1 - ngl; the output is n_layer
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
    swa_cells = min(cells, -(-(shape.n_swa + n_ubatch) // 256) * 256) if shape.n_swa else cells
    layer_cells_all = [swa_cells if shape.swa_layers[i] and shape.n_swa else cells for i in range(n_layer)]
    kv, k_bytes, v_bytes = 0.0, element_bytes(cache_type), element_bytes(ctype_v)
    for i in range(n_layer):
        if not (on_gpu[i] and kv_offload) or shape.n_head_kv[i] == 0:
            continue
        kv += layer_cells_all[i] * shape.n_head_kv[i] * (shape.head_dim_k * k_bytes + shape.head_dim_v * v_bytes)
    attn_cells = [c for c, h in zip(layer_cells_all, shape.n_head_kv) if h] or [cells]
    n_embd_k = max(shape.n_head_kv) * shape.head_dim_k
    n_embd_v = max(shape.n_head_kv) * shape.head_dim_v
    ff_active = shape.n_ff_exp * shape.n_expert_used if shape.n_expert else shape.n_ff
    moe_embd = shape.n_expert_used * shape.n_embd if shape.n_expert else 0  # the weighted outputs of the experts
    compute = overhead = 0.0
    if ngl > 0:
        compute = n_ubatch * 4 * (cal["compute_embd_floats"] * shape.n_embd + cal["compute_ff_floats"] * ff_active
                                  + moe_embd)
        masks = sorted(set(attn_cells))  # a model with sliding-window layers has a second, smaller mask
        if flash_attn:
            f16_copies = max(attn_cells) * 2 * ((n_embd_k if cache_type != "f16" else 0)
                                                + (n_embd_v if ctype_v != "f16" else 0))
            if f16_copies:
                below = n_ubatch * 4 * (cal["attention_embd_floats"] * shape.n_embd
                                        + shape.n_head * shape.head_dim_v + moe_embd)
                compute = max(compute, below + f16_copies)
            compute += sum(masks) * n_ubatch * 2  # f16
        else:  # f32 masks and every head's KQ matrix
            compute += (sum(masks) + max(attn_cells) * shape.n_head) * n_ubatch * 4
        if shape.n_expert:
            compute += cal["moe_pool_mib"] * MIB
        overhead = (overhead_mib if overhead_mib is not None else cal["cuda_overhead_mib"]) * MIB
    total = weights + kv + compute + mmproj_bytes + lora + overhead
    return Estimate(
        weights_mb=weights / MIB, kv_cache_mb=kv / MIB, compute_mb=compute / MIB, mmproj_mb=mmproj_bytes / MIB,
        overhead_mb=overhead / MIB, total_mb=total / MIB, layers_on_gpu=sum(on_gpu) + (1 if output_on_gpu else 0),
        n_layer=n_layer, context_cells=cells,
        cache_type=cache_type if ctype_v == cache_type else f"{cache_type}/{ctype_v}",
        details={"arch": shape.arch, "file_mb": round(shape.file_bytes / MIB, 1), "n_ubatch": n_ubatch,
                 "flash_attn": flash_attn, "experts": shape.n_expert, "sliding_window": shape.n_swa},
        lora_mb=lora / MIB,
    )


def estimate_headers(headers: ModelHeaders, **kwargs) -> Estimate:
    """The estimate of a model from its parsed headers (gguf_header.read_model_headers from disk, or
    model_files.read_headers, from the Hub before any download); the one path every estimate takes."""
    mmproj_bytes = sum(t.n_bytes for t in headers.mmproj.tensors) if headers.mmproj else 0
    lora: dict[str, int] = {}  # two adapters of one tensor: both count
    for h in headers.lora:
        for t in h.tensors:
            lora[t.name] = lora.get(t.name, 0) + t.n_bytes
    est = estimate_shape(shape_from_header(headers.model), mmproj_bytes=mmproj_bytes, lora_tensors=lora, **kwargs)
    if headers.lora:
        est.details["lora_adapters"] = len(headers.lora)
    est.details["header_from"] = "disk" if headers.hub_bytes_read is None else "hub"
    if headers.hub_bytes_read is not None:
        est.details["hub_bytes_read"] = headers.hub_bytes_read  # 0: from the header cache
    return est
