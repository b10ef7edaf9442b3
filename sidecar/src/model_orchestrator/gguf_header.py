"""A fast reader of GGUF headers: metadata and tensor infos, never the tensor data.

gguf-py's GGUFReader materialises every array element as a numpy object; for a real model's 150 000-token
vocabulary that takes seconds (6.5 s for a Qwen3 header on the dev VM), which admission cannot afford on every
load. This walks the same format with struct over an mmap and skips string arrays by length.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

# value types of the GGUF format
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY_MAX = 4096  # numeric arrays up to this length are kept (per-layer head counts); longer ones only counted


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    n_bytes: int


@dataclass
class GgufHeader:
    fields: dict  # key -> value (arrays: list, or {"len": n} when long or of strings)
    tensors: list[TensorInfo]


def _type_sizes() -> dict[int, tuple[int, int]]:
    from gguf.constants import GGML_QUANT_SIZES  # (elements per block, bytes per block) per ggml type

    return {int(t): v for t, v in GGML_QUANT_SIZES.items()}


def _open_regular(path: Path):
    """Open for reading without blocking: a FIFO or a device would hang the thread that opens it (forever, for a
    pipe nobody writes), so anything but a regular file is refused."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


def read_header(path: Path) -> GgufHeader:
    with _open_regular(path) as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is too old")
        pos = 24

        def string(at: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", m, at)
            return m[at + 8:at + 8 + n].decode("utf-8", "replace"), at + 8 + n

        def value(vtype: int, at: int):
            if vtype in _SCALARS:
                fmt = _SCALARS[vtype]
                return struct.unpack_from(fmt, m, at)[0], at + struct.calcsize(fmt)
            if vtype == _STRING:
                return string(at)
            if vtype == _ARRAY:
                etype, count = struct.unpack_from("<IQ", m, at)
                at += 12
                if etype == _STRING:
                    for _ in range(count):  # skip by length; only the count matters to us
                        (n,) = struct.unpack_from("<Q", m, at)
                        at += 8 + n
                    return {"len": count}, at
                if etype in _SCALARS:
                    size = struct.calcsize(_SCALARS[etype])
                    if count <= _KEEP_ARRAY_MAX:
                        items = list(struct.unpack_from("<" + _SCALARS[etype][1] * count, m, at))
                        return items, at + size * count
                    return {"len": count}, at + size * count
                raise ValueError(f"{path}: nested arrays are not supported")
            raise ValueError(f"{path}: unknown GGUF value type {vtype}")

        fields = {}
        for _ in range(n_kv):
            key, pos = string(pos)
            (vtype,) = struct.unpack_from("<I", m, pos)
            fields[key], pos = value(vtype, pos + 4)
        sizes = _type_sizes()
        tensors = []
        for _ in range(n_tensors):
            name, pos = string(pos)
            (n_dims,) = struct.unpack_from("<I", m, pos)
            shape = struct.unpack_from(f"<{n_dims}Q", m, pos + 4)
            ggml_type, _offset = struct.unpack_from("<IQ", m, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            elements = 1
            for d in shape:
                elements *= d
            block, type_size = sizes[ggml_type]
            tensors.append(TensorInfo(name, tuple(shape), ggml_type, elements // block * type_size))
        return GgufHeader(fields, tensors)
