"""GGUF headers a hostile file or Hub repo could carry (issue 20, finding 7): each breaks one thing of a good
header. Shared by tests/test_security.py and bench/adversarial.py."""

from __future__ import annotations

import struct
from pathlib import Path

from support.registry import model, write_registry


def _gguf(path: Path, fields: dict, n_dims: int = 2) -> Path:
    """A GGUF header with `fields` (key -> (value type, payload bytes)) and a small f32 tensor per layer (4: a header
    may not claim more layers than it has tensors)."""

    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text.encode())) + text.encode()

    out = b"GGUF" + struct.pack("<IQQ", 3, 4, len(fields))
    for key, (vtype, payload) in fields.items():
        out += s(key) + struct.pack("<I", vtype) + payload
    for i in range(4):
        out += s(f"blk.{i}.attn_q.weight") + struct.pack("<I", n_dims) + struct.pack(f"<{n_dims}Q", *[8] * n_dims)
        out += struct.pack("<IQ", 0, 256 * i)
    path.write_bytes(out + b"\0" * 2048)
    return path


def _u32(v: int):
    return 4, struct.pack("<I", v)


def _str(v: str):
    return 8, struct.pack("<Q", len(v)) + v.encode()


def _arr_u32(*items: int):
    return 9, struct.pack("<IQ", 4, len(items)) + b"".join(struct.pack("<I", i) for i in items)


def _arr_str(*items: str):
    return 9, struct.pack("<IQ", 8, len(items)) + b"".join(struct.pack("<Q", len(i)) + i.encode() for i in items)


_GOOD_HEADER = {"general.architecture": _str("llama"), "llama.block_count": _u32(4), "llama.embedding_length": _u32(64),
                "llama.attention.head_count": _u32(4), "llama.feed_forward_length": _u32(128),
                "llama.vocab_size": _u32(100)}
HOSTILE_HEADERS = {  # name -> what replaces or joins the good header's fields (None: the key is left out)
    "no architecture": {"general.architecture": None},
    "architecture is a number": {"general.architecture": _u32(7)},
    "block_count is a list of strings": {"llama.block_count": _arr_str("a", "b")},
    "embedding_length is a list of strings": {"llama.embedding_length": _arr_str("x")},
    "head_count is a list of strings": {"llama.attention.head_count": _arr_str("x")},
    "head_count_kv shorter than the layers": {"llama.attention.head_count_kv": _arr_u32(4)},
    "sliding window pattern shorter than the layers": {"llama.attention.sliding_window": _u32(8),
                                                       "llama.attention.sliding_window_pattern": _arr_u32(1)},
    "no vocab_size and tokens is a number": {"llama.vocab_size": None, "tokenizer.ggml.tokens": _u32(5)},
    "expert_count is a list of strings": {"llama.expert_count": _arr_str("x")},
    "key_length is a list of strings": {"llama.attention.key_length": _arr_str("x")},
    "feed_forward_length is a list of strings": {"llama.feed_forward_length": _arr_str("x")},
}


def hostile_models(tmp_path: Path) -> list[dict]:
    """Registry entries: one good model (`good`) and one per HOSTILE_HEADERS entry (`hostile-<i>`, in order)."""
    models = [model("good", path=_gguf(tmp_path / "good.gguf", _GOOD_HEADER))]
    for i, (name, change) in enumerate(HOSTILE_HEADERS.items()):
        fields = {k: v for k, v in {**_GOOD_HEADER, **change}.items() if v is not None}
        models.append(model(f"hostile-{i}", path=_gguf(tmp_path / f"hostile-{i}.gguf", fields)))
    return models


def hostile_registry(tmp_path: Path) -> Path:
    """A registry of `hostile_models`."""
    return write_registry(tmp_path / "hostile.toml", *hostile_models(tmp_path))
