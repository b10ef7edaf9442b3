"""GGUF headers: parsed (metadata and tensor infos, never the tensor data), read from disk (`read_header`,
`read_model_headers`: a model's files as `ModelHeaders`), and the sizes of ggml types (`element_bytes`).

It walks the format with struct over an mmap and skips string arrays by length (gguf-py's reader takes seconds on a
150 000-token vocabulary). A header is input we do not control (any file a registry names, any Hub endpoint): every
count in it is checked against the bytes it would take in the file before anything is built or looped over, and a
header may not run past MAX_HEADER.
"""

from __future__ import annotations

import functools
import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

# value types of the GGUF format
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY_MAX = 4096  # numeric arrays up to this length are kept (per-layer head counts); longer ones only counted
MAX_HEADER = 256 << 20  # a header longer than this is not a model header (real ones: a few MB)
MAX_DIMS = 4  # GGML_MAX_DIMS
# the fewest bytes each item takes in the file: a KV (key length, type, a 1-byte value), a tensor info (name length,
# n_dims, type, offset), an array's string (its length)
_MIN_KV, _MIN_TENSOR, _MIN_STRING = 8 + 4 + 1, 8 + 4 + 4 + 8, 8
_U64 = struct.Struct("<Q").unpack_from


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
    header_bytes: int = 0  # where the header ends (tensor data follows after alignment padding)
    file_bytes: int = 0  # the size of the whole file


@dataclass
class ModelHeaders:
    """The parsed headers of one model's files (what estimate.py computes from), wherever they were read: on disk
    (`read_model_headers`) or on the Hub by range requests (model_files.read_headers)."""

    model: GgufHeader
    mmproj: GgufHeader | None = None
    lora: list[GgufHeader] = field(default_factory=list)  # the LoRA adapters' headers, in the registry's order
    hub_bytes_read: int | None = None  # None: all read from disk; else bytes fetched from the Hub (0: header cache)


@functools.cache
def _type_sizes() -> dict[int, tuple[int, int]]:
    from gguf.constants import GGML_QUANT_SIZES  # (elements per block, bytes per block) per ggml type

    return {int(t): v for t, v in GGML_QUANT_SIZES.items()}


def element_bytes(type_name: str) -> float:
    """Bytes per element of a ggml type by llama-server's name for it (f16, q8_0, ...: a KV cache type), from the
    format's own table, as every tensor's size here."""
    from gguf.constants import GGMLQuantizationType

    block, size = _type_sizes()[int(GGMLQuantizationType[type_name.upper()])]
    return size / block


def _open_regular(path: Path):
    """Open for reading without blocking: a FIFO or a device would hang the thread that opens it (forever, for a
    pipe nobody writes), so anything but a regular file is refused."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


class NeedMoreBytes(ValueError):
    """The buffer ends inside the header: read at least `needed` bytes from the start of the file and parse again."""

    def __init__(self, needed: int):
        super().__init__(f"the GGUF header goes on past byte {needed}")
        self.needed = needed


def read_header_cached(path: Path) -> GgufHeader:
    """read_header, remembered per file version: admission asks on every load."""
    st = Path(path).stat()
    return _read_header_cached(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _read_header_cached(path: str, mtime_ns: int, size: int) -> GgufHeader:
    return read_header(Path(path))


def read_model_headers(model: Path, mmproj: Path | None = None, lora: list[Path] = ()) -> ModelHeaders:
    """The headers of GGUF files on disk: a model, its projector, its LoRA adapters."""
    return ModelHeaders(read_header_cached(model), read_header_cached(mmproj) if mmproj else None,
                        [read_header_cached(p) for p in lora])


def read_header(path: Path) -> GgufHeader:
    """The header of a GGUF file on disk (mapped, so only the header's pages are read)."""
    with _open_regular(path) as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        try:
            return parse_header(m, str(path))
        except NeedMoreBytes:
            raise ValueError(f"{path}: truncated GGUF header") from None


def parse_header(buf, name: str = "GGUF", file_size: int | None = None) -> GgufHeader:
    """Parse the header at the start of `buf` (bytes, mmap: any buffer) of a file of `file_size` bytes (default:
    `buf` is the whole file). Raises NeedMoreBytes when `buf` holds only the beginning of the header (a remote reader
    fetches more and calls again), ValueError when it is no GGUF or a count in it cannot fit in the file."""
    m = buf  # slices of bytes and mmap are bytes; a memoryview would pin the mmap open
    end = len(m)
    limit = min(end if file_size is None else file_size, MAX_HEADER)  # where the header must end

    def need(at: int, n: int) -> None:
        if at + n > limit:
            raise ValueError(f"{name}: the GGUF header runs past "
                             + (f"the end of the file ({limit} bytes)" if limit < MAX_HEADER else
                                f"{MAX_HEADER >> 20} MiB: not a model header"))
        if at + n > end:
            raise NeedMoreBytes(at + n)

    def fits(count: int, each: int, at: int, what: str) -> None:
        """A count is checked against the bytes its items would take before they are looped over or built."""
        if count * each > limit - at:
            raise ValueError(f"{name}: {what} {count} cannot fit in the {limit - at} bytes left of the file")

    def unpack(fmt: str, at: int):
        need(at, struct.calcsize(fmt))
        return struct.unpack_from(fmt, m, at)

    need(0, 24)
    if m[:4] != b"GGUF":
        raise ValueError(f"{name} is not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
    if version < 2:
        raise ValueError(f"{name}: GGUF version {version} is too old")
    pos = 24
    fits(n_kv, _MIN_KV, pos, "a metadata count of")
    fits(n_tensors, _MIN_TENSOR, pos + n_kv * _MIN_KV, "a tensor count of")

    def string(at: int) -> tuple[str, int]:
        (n,) = unpack("<Q", at)
        need(at + 8, n)
        return m[at + 8:at + 8 + n].decode("utf-8", "replace"), at + 8 + n

    def value(vtype: int, at: int):
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            return unpack(fmt, at)[0], at + struct.calcsize(fmt)
        if vtype == _STRING:
            return string(at)
        if vtype == _ARRAY:
            etype, count = unpack("<IQ", at)
            at += 12
            if etype == _STRING:
                fits(count, _MIN_STRING, at, "an array of strings of length")
                need(at, _MIN_STRING * count)
                for _ in range(count):  # skip by length; only the count matters to us
                    if at + 8 > end:
                        need(at, 8)
                    (n,) = _U64(m, at)
                    at += 8 + n
                need(at, 0)
                return {"len": count}, at
            if etype in _SCALARS:
                size = struct.calcsize(_SCALARS[etype])
                fits(count, size, at, "an array length of")
                need(at, size * count)
                if count <= _KEEP_ARRAY_MAX:
                    items = list(struct.unpack_from("<" + _SCALARS[etype][1] * count, m, at))
                    return items, at + size * count
                return {"len": count}, at + size * count
            raise ValueError(f"{name}: nested arrays are not supported")
        raise ValueError(f"{name}: unknown GGUF value type {vtype}")

    fields = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = unpack("<I", pos)
        fields[key], pos = value(vtype, pos + 4)
    sizes = _type_sizes()
    tensors = []
    for _ in range(n_tensors):
        name_, pos = string(pos)
        (n_dims,) = unpack("<I", pos)
        if n_dims > MAX_DIMS:
            raise ValueError(f"{name}: tensor {name_} has {n_dims} dimensions (at most {MAX_DIMS})")
        shape = unpack(f"<{n_dims}Q", pos + 4)
        ggml_type, _offset = unpack("<IQ", pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        elements = 1
        for d in shape:
            elements *= d
        if ggml_type not in sizes:
            raise ValueError(f"{name}: tensor {name_} has unknown ggml type {ggml_type}")
        block, type_size = sizes[ggml_type]
        tensors.append(TensorInfo(name_, tuple(shape), ggml_type, elements // block * type_size))
    return GgufHeader(fields, tensors, header_bytes=pos, file_bytes=end if file_size is None else file_size)
