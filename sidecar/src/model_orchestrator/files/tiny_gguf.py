"""The generated default model: a tiny GGUF that loads in milliseconds on a CPU and always answers HELLO_TEXT.

It backs the registry's `generated` source (e.g. `tiny-chat`): a real llama-server serving a known answer, for trying
the stack without a download. Its weights are hand-wired as a *bigram program*: each token of the reply gets its own
direction in the residual stream (every other token shares direction 0), attention and FFN outputs are zero, and
the lm_head maps each direction to a large logit (margin ``_MARGIN``) on the next token of the reply; the reply's
last token is followed by ``<|im_end|>``. The margin makes sampling effectively greedy at any temperature.

The tokenizer is a small byte-level BPE (``gpt2`` / pre ``qwen2``, merges learned from a built-in corpus) with
ChatML control tokens, Hermes ``<tool_call>`` tokens and the Qwen2.5 chat template; it is shared by the test
fixtures (tests/support/tiny_models.py: a tool-calling model, random weights, other architectures, a vision
projector) and by bench/synthetic_gguf.py, so `build_vocab`, `write_tokenizer` and `write_gguf` are public here.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

HELLO_TEXT = "Hello from a tiny model!"
TOOL_CALL = {"name": "get_weather", "arguments": {"location": "San Francisco"}}


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


def _hello_tensors(n_vocab: int, ids: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The weights of the hello program (qwen3 layout; numpy layout = reversed ggml shape)."""
    q_dim, kv_dim = _HEAD_DIM * _N_HEAD, _HEAD_DIM * _N_HEAD_KV
    hello = [ids[p] for p in _HELLO_PIECES]
    direction = {tok: i + 1 for i, tok in enumerate(hello)}
    embd = np.zeros((n_vocab, _N_EMBD), dtype=np.float32)
    embd[:, 0] = 1.0
    for tok, d in direction.items():
        embd[tok, 0], embd[tok, d] = 0.0, 1.0
    # after the final RMSNorm (weight 1) a lone one-hot direction reads sqrt(n_embd): one unit wins by _MARGIN
    unit = _MARGIN / np.sqrt(_N_EMBD)
    out = np.zeros((n_vocab, _N_EMBD), dtype=np.float32)
    out[hello[0], 0] = unit
    for i, tok in enumerate(hello):
        out[hello[i + 1] if i + 1 < len(hello) else ids["<|im_end|>"], direction[tok]] = unit
    t = {"token_embd.weight": embd, "output.weight": out, "output_norm.weight": np.ones(_N_EMBD, dtype=np.float32)}
    for i in range(_N_LAYER):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = np.ones(_N_EMBD, dtype=np.float32)
        t[p + "attn_q.weight"] = (rng.standard_normal((q_dim, _N_EMBD)) * 0.2).astype(np.float32)
        t[p + "attn_k.weight"] = (rng.standard_normal((kv_dim, _N_EMBD)) * 0.2).astype(np.float32)
        # zero value/output and FFN-down projections keep the residual stream equal to the token's embedding
        t[p + "attn_v.weight"] = np.zeros((kv_dim, _N_EMBD), dtype=np.float32)
        t[p + "attn_output.weight"] = np.zeros((_N_EMBD, q_dim), dtype=np.float32)
        t[p + "attn_q_norm.weight"] = np.ones(_HEAD_DIM, dtype=np.float32)
        t[p + "attn_k_norm.weight"] = np.ones(_HEAD_DIM, dtype=np.float32)
        t[p + "ffn_norm.weight"] = np.ones(_N_EMBD, dtype=np.float32)
        t[p + "ffn_gate.weight"] = (rng.standard_normal((_N_FF, _N_EMBD)) * 0.2).astype(np.float32)
        t[p + "ffn_up.weight"] = (rng.standard_normal((_N_FF, _N_EMBD)) * 0.2).astype(np.float32)
        t[p + "ffn_down.weight"] = np.zeros((_N_EMBD, _N_FF), dtype=np.float32)
    return t


def write_tiny_model(path: str | pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Write the generated default model (qwen3 architecture, ~0.55 MB, f32) to ``path``: chat answers exactly
    HELLO_TEXT with finish_reason 'stop'. ``seed`` only affects weights that do not influence the reply."""
    tokens, types, merges, ids = build_vocab()
    return write_gguf(path, "qwen3", "tiny-qwen3-hello", tokens, types, merges, ids,
                      _hello_tensors(len(tokens), ids, np.random.default_rng(seed)))


def write_gguf(path: str | pathlib.Path, arch: str, name: str, tokens: list[str], types: list[int],
               merges: list[str], ids: dict[str, int], tensors: dict[str, np.ndarray]) -> pathlib.Path:
    """A tiny model's GGUF: the fixed geometry of this module, the shared tokenizer and the given weights."""
    import gguf  # imported lazily: only writers need it

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
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
    for tensor_name, arr in tensors.items():
        w.add_tensor(tensor_name, arr)
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
