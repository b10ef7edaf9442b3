"""Tiny deterministic GGUF fixtures beyond the product's generated default (model_orchestrator.files.tiny_gguf, which
answers HELLO_TEXT): a tool-calling model, random weights, the llama and qwen3moe architectures, and a tiny vision
projector. Same tokenizer and geometry as the product's (its `build_vocab` and `write_gguf`).

The 'tool_call' model answers ``<tool_call>`` JSON for TOOL_CALL, which llama-server (``--jinja``) returns as an
OpenAI tool_calls entry when the request has tools; one layer-0 attention head detects a ``<tool_response>`` token
anywhere in the prompt, after which it answers HELLO_TEXT instead, so agent loops terminate.

`write_tiny_lora` writes a LoRA adapter for the 'hello' model (qwen3): applied at scale 1, the model answers
LORA_TEXT instead of HELLO_TEXT; at scale 0 it changes nothing.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Sequence

import numpy as np

from model_orchestrator.files.tiny_gguf import (HELLO_TEXT, TOOL_CALL, _DETECT_SCORE, _HEAD_DIM, _HELLO_PIECES, _MARGIN,
                                          _N_EMBD, _N_EXPERT, _N_FF, _N_FF_EXP, _N_HEAD, _N_HEAD_KV, _N_LAYER,
                                          _TOOL_PIECES, build_vocab, write_gguf)

__all__ = ["HELLO_TEXT", "LORA_TEXT", "TOOL_CALL", "ARCHS", "BEHAVIOURS", "write_tiny_model", "write_tiny_mmproj",
           "write_tiny_lora"]

ARCHS = ("llama", "qwen3", "qwen3moe")
BEHAVIOURS = ("hello", "tool_call", "random")


def _tensors(
    arch: str, n_vocab: int, behaviour: str, ids: dict[str, int], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """All weight tensors (numpy layout = reversed ggml shape) for arch/behaviour.

    Deterministic behaviours use the bigram program described in the module
    docstring.  For 'tool_call', layer 0 additionally has one attention head
    that raises a "tool result seen" flag in the residual stream when any
    ``<tool_response>`` token is in the context; with the flag, the reply is
    HELLO_TEXT instead of a second tool call, so agent loops terminate.
    """
    rand = behaviour == "random"
    kv_dim = _HEAD_DIM * _N_HEAD_KV
    q_dim = _HEAD_DIM * _N_HEAD

    def rnd(*shape: int, std: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def zeros(*shape: int) -> np.ndarray:
        return np.zeros(shape, dtype=np.float32)

    t: dict[str, np.ndarray] = {}
    eos = ids["<|im_end|>"]
    hello = [ids[p] for p in _HELLO_PIECES]
    tool = [ids[p] for p in _TOOL_PIECES]
    detect = behaviour == "tool_call"
    # Residual-stream directions: 0 = any other token, then one per reply
    # token, then (tool_call only) the <tool_response> token and the flag.
    program = hello + tool if detect else hello
    direction = {tok: i + 1 for i, tok in enumerate(program)}
    d_resp = len(program) + 1
    d_flag = len(program) + 2
    if d_flag >= _N_EMBD:
        raise ValueError("hidden size too small for the reply")
    if detect:
        direction[ids["<tool_response>"]] = d_resp

    if rand:
        t["token_embd.weight"] = rnd(n_vocab, _N_EMBD, std=1.0)
        t["output.weight"] = rnd(n_vocab, _N_EMBD, std=0.5)
    else:
        embd = zeros(n_vocab, _N_EMBD)
        embd[:, 0] = 1.0
        for tok, d in direction.items():
            embd[tok, 0] = 0.0
            embd[tok, d] = 1.0
        # lm_head.  After the final RMSNorm (weight 1) a lone one-hot
        # direction reads sqrt(n_embd); direction + flag read sqrt(n_embd/2)
        # each.  Weights: unknown context -> 1 unit on the first reply token,
        # flag -> 2 units on "Hello", reply token -> 4 units on its successor,
        # so each case wins by >= 1 unit * sqrt(n_embd/2) = _MARGIN.
        unit = _MARGIN / np.sqrt(_N_EMBD / 2) if detect else _MARGIN / np.sqrt(_N_EMBD)
        succ = 4.0 * unit if detect else unit
        out = zeros(n_vocab, _N_EMBD)
        first = tool[0] if detect else hello[0]
        out[first, 0] = unit
        for seq in ([hello, tool] if detect else [hello]):
            for i, tok in enumerate(seq):
                out[seq[i + 1] if i + 1 < len(seq) else eos, direction[tok]] = succ
        if detect:
            out[first, d_resp] = unit
            out[hello[0], d_flag] = 2.0 * unit
        t["token_embd.weight"], t["output.weight"] = embd, out

    t["output_norm.weight"] = np.ones(_N_EMBD, dtype=np.float32)
    qk_norm = arch in ("qwen3", "qwen3moe")
    for i in range(_N_LAYER):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = np.ones(_N_EMBD, dtype=np.float32)
        if rand:
            wq, wk, wv, wo = rnd(q_dim, _N_EMBD), rnd(kv_dim, _N_EMBD), rnd(kv_dim, _N_EMBD), rnd(_N_EMBD, q_dim)
        else:
            # Zero value/output projections keep the residual stream equal to
            # the current token's embedding (plus the flag, see below).
            wq, wk, wv, wo = rnd(q_dim, _N_EMBD), rnd(kv_dim, _N_EMBD), zeros(kv_dim, _N_EMBD), zeros(_N_EMBD, q_dim)
        q_norm = np.ones(_HEAD_DIM, dtype=np.float32)
        k_norm = np.ones(_HEAD_DIM, dtype=np.float32)
        if detect and i == 0:
            # Head 0 (kv head 0): every query is the same vector on head dim
            # 15 (lowest RoPE frequency in both NORM and NEOX layouts, and the
            # rope base is 1e6, so scores are position independent); only the
            # <tool_response> key is non-zero there, scoring _DETECT_SCORE.
            # Its value (1.0 on head dim 0) is written to the flag direction.
            hd = _HEAD_DIM - 1
            wq, wk = zeros(q_dim, _N_EMBD), zeros(kv_dim, _N_EMBD)
            norm_in = np.sqrt(_N_EMBD)  # attn_norm output of a one-hot embedding
            if qk_norm:
                # q/k RMSNorm turn a single non-zero dim into sqrt(head_dim)*weight.
                g = np.sqrt(_DETECT_SCORE * np.sqrt(_HEAD_DIM) / _HEAD_DIM)
                wq[hd, :], wk[hd, d_resp] = 1.0, 1.0
                q_norm[:], k_norm[:] = g, g
            else:
                c = np.sqrt(_DETECT_SCORE * np.sqrt(_HEAD_DIM)) / norm_in
                wq[hd, :], wk[hd, d_resp] = c, c
            wv[0, d_resp] = 1.0 / norm_in
            wo[d_flag, 0] = 1.0
        t[p + "attn_q.weight"], t[p + "attn_k.weight"] = wq, wk
        t[p + "attn_v.weight"], t[p + "attn_output.weight"] = wv, wo
        if qk_norm:
            t[p + "attn_q_norm.weight"] = q_norm
            t[p + "attn_k_norm.weight"] = k_norm
        t[p + "ffn_norm.weight"] = np.ones(_N_EMBD, dtype=np.float32)
        if arch == "qwen3moe":
            t[p + "ffn_gate_inp.weight"] = rnd(_N_EXPERT, _N_EMBD)
            t[p + "ffn_gate_exps.weight"] = rnd(_N_EXPERT, _N_FF_EXP, _N_EMBD)
            t[p + "ffn_up_exps.weight"] = rnd(_N_EXPERT, _N_FF_EXP, _N_EMBD)
            down = rnd(_N_EXPERT, _N_EMBD, _N_FF_EXP)
            # Zero down projection: the FFN adds nothing to the residual stream.
            t[p + "ffn_down_exps.weight"] = down if rand else np.zeros_like(down)
        else:
            t[p + "ffn_gate.weight"] = rnd(_N_FF, _N_EMBD)
            t[p + "ffn_up.weight"] = rnd(_N_FF, _N_EMBD)
            t[p + "ffn_down.weight"] = rnd(_N_EMBD, _N_FF) if rand else zeros(_N_EMBD, _N_FF)
    return t


def write_tiny_model(
    path: str | pathlib.Path, *, behaviour: str = "hello", arch: str = "qwen3", seed: int = 0
) -> pathlib.Path:
    """Write a tiny GGUF chat model: 'hello' answers exactly HELLO_TEXT; 'tool_call' answers TOOL_CALL as a
    ``<tool_call>`` (a tool_calls entry when the request has tools) and HELLO_TEXT once a tool result is in the
    conversation; 'random' has random weights (gibberish). All three archs are deterministic for hello/tool_call."""
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"behaviour must be one of {BEHAVIOURS}, got {behaviour!r}")
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    tokens, types, merges, ids = build_vocab()
    tensors = _tensors(arch, len(tokens), behaviour, ids, np.random.default_rng(seed))
    return write_gguf(path, arch, f"tiny-{arch}-{behaviour}", tokens, types, merges, ids, tensors)


# The LoRA's reply: tokens of the hello program in another order, so the base model's residual directions drive it.
_LORA_PIECES = ("Hello", " model", "!")
LORA_TEXT = "".join(_LORA_PIECES)


def write_tiny_lora(path: str | pathlib.Path, *, arch: str = "qwen3") -> pathlib.Path:
    """Write a LoRA adapter GGUF for the 'hello' model: at scale 1 its answer is LORA_TEXT ("Hello model!").

    How: only the lm_head (`output.weight`) changes. The hello model's residual stream is one direction per reply
    token; its lm_head W maps each to a logit of _MARGIN on the next token. The adapter's delta is W' - W, W' being
    the same program wired for LORA_TEXT ("Hello" -> " model" -> "!" -> <|im_end|>). W' - W is non-zero only in the
    columns of the tokens whose successor changed, so it factors exactly as B @ A with A selecting those columns
    (rank 3) and B their deltas. With adapter.lora.alpha = rank, llama.cpp applies scale x (B @ A): scale 1 gives W'
    exactly, scale 0 gives W, and each answer wins by the full margin (scales near 0.5 are a tie: avoid them).
    """
    import gguf

    from model_orchestrator.files.tiny_gguf import _hello_tensors

    if arch != "qwen3":
        raise ValueError("the tiny LoRA is for the qwen3 'hello' model")
    tokens, _types, _merges, ids = build_vocab()
    base = _hello_tensors(len(tokens), ids, np.random.default_rng(0))["output.weight"]
    hello = [ids[p] for p in _HELLO_PIECES]
    direction = {tok: i + 1 for i, tok in enumerate(hello)}
    lora_seq = [ids[p] for p in _LORA_PIECES] + [ids["<|im_end|>"]]
    target = base.copy()
    unit = _MARGIN / np.sqrt(_N_EMBD)
    for tok, nxt in zip(lora_seq, lora_seq[1:]):
        col = direction[tok]
        target[:, col] = 0.0
        target[nxt, col] = unit
    delta = target - base
    cols = [c for c in range(_N_EMBD) if np.any(delta[:, c])]
    rank = len(cols)
    lora_a = np.zeros((rank, _N_EMBD), dtype=np.float32)  # ggml {n_embd, rank}: ne0 = the base tensor's ne0
    for r, c in enumerate(cols):
        lora_a[r, c] = 1.0
    lora_b = np.ascontiguousarray(delta[:, cols], dtype=np.float32)  # ggml {rank, n_vocab}
    assert np.allclose(lora_b @ lora_a, delta)

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_name("tiny-qwen3-hello-lora")
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
    w.add_tensor("output.weight.lora_a", lora_a)
    w.add_tensor("output.weight.lora_b", lora_b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# Vision projector geometry (LLaVA-style "mlp" projector, CLIP encoder).
_V_IMAGE_SIZE = 28
_V_PATCH = 14
_V_EMBD = 32
_V_HEAD = 2
_V_FF = 64
_V_LAYER = 2
_V_MM_HIDDEN = 64


def write_tiny_mmproj(
    path: str | pathlib.Path, *, text_model_hidden: int = _N_EMBD, seed: int = 0
) -> pathlib.Path:
    """Write a tiny multimodal projector (``--mmproj``) GGUF and return the path.

    Why: lets tests exercise llama-server's image path (``image_url`` parts)
    without a real vision model.  It is a 2-layer CLIP encoder (28x28 input,
    14x14 patches -> 4 image tokens) with a LLaVA ``mlp`` projector whose
    output width must equal the text model's hidden size
    (``text_model_hidden``, 64 for :func:`write_tiny_model`).  Weights are
    random; the deterministic text models ignore image embeddings because
    only the last token's embedding drives their reply.
    """
    import gguf

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def rnd(*shape: int, std: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    n_patches = (_V_IMAGE_SIZE // _V_PATCH) ** 2
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_name("tiny-mmproj")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_audio_encoder", False)
    w.add_bool("clip.use_gelu", True)
    w.add_string("clip.projector_type", "mlp")
    w.add_uint32("clip.vision.image_size", _V_IMAGE_SIZE)
    w.add_uint32("clip.vision.patch_size", _V_PATCH)
    w.add_uint32("clip.vision.embedding_length", _V_EMBD)
    w.add_uint32("clip.vision.feed_forward_length", _V_FF)
    w.add_uint32("clip.vision.block_count", _V_LAYER)
    w.add_uint32("clip.vision.projection_dim", text_model_hidden)
    w.add_uint32("clip.vision.attention.head_count", _V_HEAD)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

    # numpy layout = reversed ggml shape, e.g. conv kernel {P, P, 3, E} -> (E, 3, P, P)
    w.add_tensor("v.patch_embd.weight", rnd(_V_EMBD, 3, _V_PATCH, _V_PATCH).astype(np.float16))
    w.add_tensor("v.patch_embd.bias", np.zeros(_V_EMBD, dtype=np.float32))
    w.add_tensor("v.position_embd.weight", rnd(n_patches, _V_EMBD))
    for i in range(_V_LAYER):
        p = f"v.blk.{i}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w.add_tensor(p + name + ".weight", rnd(_V_EMBD, _V_EMBD, std=0.2))
            w.add_tensor(p + name + ".bias", np.zeros(_V_EMBD, dtype=np.float32))
        for name in ("ln1", "ln2"):
            w.add_tensor(p + name + ".weight", np.ones(_V_EMBD, dtype=np.float32))
            w.add_tensor(p + name + ".bias", np.zeros(_V_EMBD, dtype=np.float32))
        w.add_tensor(p + "ffn_up.weight", rnd(_V_FF, _V_EMBD, std=0.2))
        w.add_tensor(p + "ffn_up.bias", np.zeros(_V_FF, dtype=np.float32))
        w.add_tensor(p + "ffn_down.weight", rnd(_V_EMBD, _V_FF, std=0.2))
        w.add_tensor(p + "ffn_down.bias", np.zeros(_V_EMBD, dtype=np.float32))
    w.add_tensor("mm.0.weight", rnd(_V_MM_HIDDEN, _V_EMBD, std=0.2))
    w.add_tensor("mm.0.bias", np.zeros(_V_MM_HIDDEN, dtype=np.float32))
    w.add_tensor("mm.2.weight", rnd(text_model_hidden, _V_MM_HIDDEN, std=0.2))
    w.add_tensor("mm.2.bias", np.zeros(text_model_hidden, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Write a fixture: ``python tests/support/tiny_models.py OUT.gguf --behaviour tool_call``."""
    ap = argparse.ArgumentParser(description="Write a tiny deterministic GGUF chat model.")
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--behaviour", choices=BEHAVIOURS, default="hello")
    ap.add_argument("--arch", choices=ARCHS, default="qwen3")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = write_tiny_model(args.out, behaviour=args.behaviour, arch=args.arch, seed=args.seed)
    print(f"{out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
