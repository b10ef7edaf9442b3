"""Tiny, deterministic GGUF language models for tests.

Why: integration tests of the orchestrator need a *real* ``llama-server`` that
loads a model in well under a second and answers chat requests with a known,
reproducible reply (plain text or an OpenAI ``tool_calls`` entry).  Downloading
real models is slow and their answers are not predictable, so this module
writes a few-hundred-KB GGUF whose weights are hand-wired as a *bigram
program*:

* every token that takes part in the fixed reply gets its own one-hot
  direction in the residual stream, every other token shares direction 0;
* attention output and FFN down projections are zero, so the residual stream
  at the last position is exactly the embedding of the current token;
* the output (lm_head) matrix maps each direction to a large logit (margin
  ``_MARGIN``) on the *next* token of the fixed reply; direction 0 ("any
  other token", e.g. the ``\\n`` that ends the ``<|im_start|>assistant\\n``
  generation prompt) starts the reply, the reply's last token is followed by
  ``<|im_end|>`` (EOS).

The margin is so large that sampling is effectively greedy (with
llama-server's default top_k/min_p truncation at any temperature).  All reply
tokens are distinct multi-character tokens so a bigram model can encode the
sequence.  The tokenizer is a small byte-level BPE (``gpt2`` / pre ``qwen2``,
merges learned from a built-in corpus) with ChatML control tokens and the
Qwen2.5 chat template, so llama-server's Hermes/Qwen tool-call parser turns
the ``tool_call`` reply into a real ``tool_calls`` entry.

The 'tool_call' model also has one layer-0 attention head that detects a
``<tool_response>`` token anywhere in the prompt; once a tool result is in
the conversation it answers HELLO_TEXT instead, so agent loops terminate.

:func:`write_tiny_mmproj` writes a matching tiny vision projector so the
image (``image_url``) path of ``llama-server --mmproj`` can be exercised.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Sequence

import numpy as np

HELLO_TEXT = "Hello from a tiny model!"
TOOL_CALL = {"name": "get_weather", "arguments": {"location": "San Francisco"}}

ARCHS = ("llama", "qwen3", "qwen3moe")
BEHAVIOURS = ("hello", "tool_call", "random")

# Model geometry: small enough for < 1 MB at f32, big enough for one-hot
# directions of every reply token (hidden >= reply tokens + 1).
_N_EMBD = 64
_N_HEAD = 4
_N_HEAD_KV = 2
_HEAD_DIM = _N_EMBD // _N_HEAD
_N_FF = 128
_N_LAYER = 2
_N_EXPERT = 4
_N_EXPERT_USED = 2
_N_FF_EXP = 32
_N_CTX_TRAIN = 4096
_RMS_EPS = 1e-6
# Minimum logit lead of the intended next token (other logits are ~0).
# With llama-server's default min_p/top_k only the top token survives; even
# without truncation the reply is stable up to temperature ~20.
_MARGIN = 256.0
# Attention score (pre-softmax) of the <tool_response> detector head; e^40
# outweighs any number of other positions in a realistic context.
_DETECT_SCORE = 40.0
# Large rope base: the detector's low-frequency dims barely rotate.
_ROPE_BASE = 1e6

# Control tokens (ChatML) and user-defined tokens (Qwen2.5 tool markup).
_CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_USER_DEFINED_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

# Reply pieces.  Every piece must be a distinct token (bigram program).
_HELLO_PIECES = ("Hello", " from", " a", " tiny", " model", "!")
_TOOL_PIECES = (
    "<tool_call>",
    '\n{"name": "',
    "get_weather",
    '", "arguments": {"',
    "location",
    '": "',
    "San Francisco",
    '"}}\n',
    "</tool_call>",
)

# BPE merges are learned (deterministically, at write time) from this small
# corpus so that prompts -- especially the tools system prompt and tool JSON
# schemas -- need few tokens and fit a 512-token context.  Pure byte-level
# tokenization would need one token per byte.
_N_MERGES = 320
_MERGE_CORPUS = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather", '
    '"parameters": {"type": "object", "properties": {"location": {"type": "string", "description": '
    '"The city and state, e.g. San Francisco, CA"}, "unit": {"type": "string", "enum": ["celsius", '
    '"fahrenheit"]}}, "required": ["location"]}}}\n'
    '{"type": "function", "function": {"name": "search", "description": "Search the web", "parameters": '
    '{"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}, '
    '"strict": {"type": "boolean"}, "items": {"type": "array", "items": {"type": "number"}}}, '
    '"required": ["query"]}}}\n</tools>\n\nFor each function call, return a json object with function '
    "name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": "
    "<function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
    "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
    "{\"location\": \"San Francisco\"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n"
    "It is sunny and 20 degrees.\n</tool_response><|im_end|>\n"
    "What's the weather like in Paris today? Hello, how are you? Please say hello. "
    "Tell me a short story about this image and what you can see in the picture. "
    "The quick brown fox jumps over the lazy dog. Can you help me with something? "
    "Thank you very much! This is a test of the model, which should answer the question. "
    "What is the capital of France? Write a poem. Summarize the following text in one sentence. "
    "I have been there, they were here, we will go, it should work, there is nothing to do.\n"
)
# Approximation of llama.cpp's qwen2 pre-tokenizer regex (Python's ``re``
# lacks \p{L}); merges only need to be valid, not optimal.
_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\w]?[^\W\d_]+|\d| ?[^\s\w]+[\r\n]*|_+|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5-Instruct chat template (Hermes-style <tool_call> JSON), with a
# neutral default system prompt.  llama-server's differential autoparser
# derives the tool-call format from how this template renders tool calls.
CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# GGUF token types (gguf.TokenType values), kept local so the tokenizer
# builder does not need the gguf import.
_TT_NORMAL = 1
_TT_CONTROL = 3
_TT_USER_DEFINED = 4


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte -> printable unicode map; byte-level BPE stores tokens in this alphabet."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _encode_piece(text: str, byte_map: dict[int, str]) -> str:
    """Encode a plain-text piece into the byte-level token alphabet."""
    return "".join(byte_map[b] for b in text.encode("utf-8"))


def _expected_tool_text() -> str:
    """The literal reply of the 'tool_call' behaviour (Hermes/Qwen2.5 format)."""
    return "<tool_call>\n" + json.dumps(TOOL_CALL) + "\n</tool_call>"


def _train_merges(byte_map: dict[int, str]) -> list[str]:
    """Learn up to ``_N_MERGES`` BPE merges from ``_MERGE_CORPUS`` (deterministic).

    Why: a handful of hundred merges make the tokenizer ~3x denser than raw
    bytes so a tools prompt fits ``-c 512`` while the vocab stays tiny.
    """
    import re
    from collections import Counter

    text = _MERGE_CORPUS
    for special in _CONTROL_TOKENS + _USER_DEFINED_TOKENS:
        text = text.replace(special, " ")
    counts = Counter(re.findall(_PRETOKENIZE, text))
    words = [[byte_map[b] for b in w.encode("utf-8")] for w in sorted(counts)]
    freq = [counts[w] for w in sorted(counts)]
    pairs: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for wi, syms in enumerate(words):
        for pair in zip(syms, syms[1:]):
            pairs[pair] += freq[wi]
            where.setdefault(pair, set()).add(wi)
    merges: list[str] = []
    while len(merges) < _N_MERGES and pairs:
        best, cnt = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if cnt < 2:
            break
        merges.append(f"{best[0]} {best[1]}")
        joined = best[0] + best[1]
        for wi in sorted(where.pop(best, ())):
            syms, n = words[wi], freq[wi]
            for pair in zip(syms, syms[1:]):  # retract this word's pairs
                pairs[pair] -= n
                if pairs[pair] <= 0:
                    del pairs[pair]
            out: list[str] = []
            i = 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == best[0] and syms[i + 1] == best[1]:
                    out.append(joined)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[wi] = out
            for pair in zip(out, out[1:]):  # re-add with the merged symbols
                pairs[pair] += n
                where.setdefault(pair, set()).add(wi)
    return merges


def build_vocab() -> tuple[list[str], list[int], list[str], dict[str, int]]:
    """Build the shared tokenizer: (tokens, token types, merges, piece->id).

    The vocabulary is identical for every behaviour so fixtures only differ
    in weights.  ``piece->id`` maps the plain-text reply pieces and special
    token texts to their ids.
    """
    assert "".join(_HELLO_PIECES) == HELLO_TEXT
    assert "".join(_TOOL_PIECES) == _expected_tool_text()
    byte_map = _bytes_to_unicode()
    tokens: list[str] = [byte_map[b] for b in range(256)]
    types: list[int] = [_TT_NORMAL] * 256
    index: dict[str, int] = {t: i for i, t in enumerate(tokens)}

    def add(tok: str, ttype: int) -> int:
        if tok not in index:
            index[tok] = len(tokens)
            tokens.append(tok)
            types.append(ttype)
        return index[tok]

    merges = _train_merges(byte_map)
    for m in merges:
        a, b = m.split(" ")
        add(a + b, _TT_NORMAL)

    piece_ids: dict[str, int] = {}
    for piece in _HELLO_PIECES + _TOOL_PIECES:
        if piece in _USER_DEFINED_TOKENS:
            continue
        piece_ids[piece] = add(_encode_piece(piece, byte_map), _TT_NORMAL)
    for tok in _CONTROL_TOKENS:
        piece_ids[tok] = add(tok, _TT_CONTROL)
    for tok in _USER_DEFINED_TOKENS:
        piece_ids[tok] = add(tok, _TT_USER_DEFINED)
    return tokens, types, merges, piece_ids


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
    """Write a tiny GGUF chat model to ``path`` and return the path.

    behaviour: 'hello' -> chat answers exactly HELLO_TEXT (finish_reason
    'stop'); 'tool_call' -> answers ``<tool_call>`` JSON for TOOL_CALL, which
    llama-server (``--jinja``) returns as an OpenAI tool_calls entry when the
    request has tools (finish_reason 'tool_calls'; without tools the raw
    ``<tool_call>`` text comes back as content), and answers HELLO_TEXT once
    a tool result (role 'tool') is in the conversation; 'random' -> random
    weights (gibberish).  arch: 'llama', 'qwen3' or 'qwen3moe'; all three
    are deterministic for 'hello'/'tool_call'.  ``seed`` only affects weights
    that do not influence the deterministic reply.  Output: ~0.55 MB, f32.
    """
    import gguf  # imported lazily: only writers need it

    if behaviour not in BEHAVIOURS:
        raise ValueError(f"behaviour must be one of {BEHAVIOURS}, got {behaviour!r}")
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    tokens, types, merges, ids = build_vocab()
    rng = np.random.default_rng(seed)
    tensors = _tensors(arch, len(tokens), behaviour, ids, rng)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}-{behaviour}")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(_N_CTX_TRAIN)
    w.add_embedding_length(_N_EMBD)
    w.add_block_count(_N_LAYER)
    w.add_feed_forward_length(_N_FF)
    w.add_head_count(_N_HEAD)
    w.add_head_count_kv(_N_HEAD_KV)
    w.add_key_length(_HEAD_DIM)
    w.add_value_length(_HEAD_DIM)
    w.add_rope_dimension_count(_HEAD_DIM)
    w.add_rope_freq_base(_ROPE_BASE)
    w.add_layer_norm_rms_eps(_RMS_EPS)
    w.add_vocab_size(len(tokens))
    if arch == "qwen3moe":
        w.add_expert_count(_N_EXPERT)
        w.add_expert_used_count(_N_EXPERT_USED)
        w.add_expert_feed_forward_length(_N_FF_EXP)

    write_tokenizer(w, tokens, types, merges, ids)

    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tokenizer(w, tokens: list[str], types: list[int], merges: list[str], ids: dict[str, int]) -> None:
    """The byte-level BPE tokenizer, ChatML specials and the Qwen chat template (also used by bench/synthetic_gguf.py)."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(ids["<|endoftext|>"])
    w.add_eos_token_id(ids["<|im_end|>"])
    w.add_pad_token_id(ids["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


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
    import gguf  # imported lazily: only writers need it

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
    """CLI: write a tiny model (``python -m model_orchestrator.tiny_gguf OUT.gguf``)."""
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
