#!/usr/bin/env python3
"""GGUF files with the real shapes of well-known models and all-zero Q4_0 weights, written in a second.

For memory measurements only: llama-server allocates exactly what it would for the real model (same tensors, types
and sizes, same KV geometry), while the file is sparse (the weight bytes are a hole), so a 16 GiB "Qwen3-30B-A3B"
costs no disk and no download. The tokenizer is tiny_gguf's, padded to the real vocabulary size.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

SHAPES = {
    # Qwen3-0.6B: the smallest current dense model (QK norms, tied embeddings)
    "qwen3-0.6b": dict(arch="qwen3", n_layer=28, n_embd=1024, n_head=16, n_head_kv=8, head_dim=128, n_ff=3072,
                       n_vocab=151936, tied=True),
    # Llama-3.2-1B: small dense, tied embeddings
    "llama-1b": dict(arch="llama", n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, head_dim=64, n_ff=8192,
                     n_vocab=128256, tied=True),
    # Llama-3.1-8B: the 8B-class dense model
    "llama-8b": dict(arch="llama", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, head_dim=128, n_ff=14336,
                     n_vocab=128256, tied=False),
    # Qwen3-30B-A3B: the guide's MoE (Qwen3-VL-30B-A3B's text model has the same shape)
    "qwen3-30b-a3b": dict(arch="qwen3moe", n_layer=48, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128, n_ff=6144,
                          n_expert=128, n_expert_used=8, n_ff_exp=768, n_vocab=151936, tied=False),
}

ALIGN = 32


def _tensors(s: dict) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, ggml shape ne0..neN, quantized?) for every tensor of the shape."""
    e, hd, v = s["n_embd"], s["head_dim"], s["n_vocab"]
    q, kv = s["n_head"] * hd, s["n_head_kv"] * hd
    out = [("token_embd.weight", (e, v), True), ("output_norm.weight", (e,), False)]
    if not s["tied"]:
        out.append(("output.weight", (e, v), True))
    for i in range(s["n_layer"]):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (e,), False), (b + "attn_q.weight", (e, q), True),
                (b + "attn_k.weight", (e, kv), True), (b + "attn_v.weight", (e, kv), True),
                (b + "attn_output.weight", (q, e), True), (b + "ffn_norm.weight", (e,), False)]
        if s["arch"] in ("qwen3", "qwen3moe"):
            out += [(b + "attn_q_norm.weight", (hd,), False), (b + "attn_k_norm.weight", (hd,), False)]
        if s["arch"] == "qwen3moe":
            x, f = s["n_expert"], s["n_ff_exp"]
            out += [(b + "ffn_gate_inp.weight", (e, x), False), (b + "ffn_gate_exps.weight", (e, f, x), True),
                    (b + "ffn_up_exps.weight", (e, f, x), True), (b + "ffn_down_exps.weight", (f, e, x), True)]
        else:
            f = s["n_ff"]
            out += [(b + "ffn_gate.weight", (e, f), True), (b + "ffn_up.weight", (e, f), True),
                    (b + "ffn_down.weight", (f, e), True)]
    return out


def write_synthetic(path: Path, shape: str, *, n_ctx_train: int = 262144) -> Path:
    import gguf

    from model_orchestrator.files.tiny_gguf import build_vocab, write_tokenizer

    s = SHAPES[shape]
    arch = s["arch"]
    tokens, types, merges, ids = build_vocab()
    pad = s["n_vocab"] - len(tokens)
    tokens = tokens + [f"<|pad_{i}|>" for i in range(pad)]
    types = types + [gguf.TokenType.UNUSED] * pad
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"synthetic-{shape}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(s["n_embd"])
    w.add_block_count(s["n_layer"])
    w.add_feed_forward_length(s["n_ff"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_head_kv"])
    w.add_key_length(s["head_dim"])
    w.add_value_length(s["head_dim"])
    w.add_rope_dimension_count(s["head_dim"])
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(s["n_vocab"])
    if arch == "qwen3moe":
        w.add_expert_count(s["n_expert"])
        w.add_expert_used_count(s["n_expert_used"])
        w.add_expert_feed_forward_length(s["n_ff_exp"])
    write_tokenizer(w, tokens, types, merges, ids)
    q4 = gguf.GGMLQuantizationType.Q4_0
    data = 0
    for name, ne, quant in _tensors(s):
        n = int(np.prod(ne))
        nbytes = n // 32 * 18 if quant else n * 4
        w.add_tensor_info(name, tuple(reversed(ne)), np.float32, nbytes, raw_dtype=q4 if quant else None)
        data += -(-nbytes // ALIGN) * ALIGN
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.fout[0].flush()
    header_end = w.fout[0].tell()
    w.close()
    with open(path, "r+b") as f:  # the weights: a hole of zeros (Q4_0 blocks with scale 0)
        f.truncate(-(-header_end // ALIGN) * ALIGN + data)
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    p = write_synthetic(args.out, args.shape)
    print(p, os.path.getsize(p))
