"""The page cache: which parts of a file are in memory already (mincore(2)), and reading in only the parts that are
not. The dispatcher reads the next model's file while its victims drain (scheduler.plan's `prefetch`), so the load
that follows reads from memory instead of the disk; a file that is cached already costs one mincore call, not a copy
of its gigabytes (which would compete with the loads under way for memory bandwidth).

Linux and other POSIX systems with mincore; where the call is missing, every page counts as missing (the file is
read, as before this module existed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import stat
from pathlib import Path

_PAGE = mmap.PAGESIZE
_READ_CHUNK = 8 << 20
_PROT_READ = 0x1
_MAP_SHARED = 0x01
_MAP_FAILED = ctypes.c_void_p(-1).value
_RESIDENT_BIT = bytes(b & 1 for b in range(256))


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def missing_ranges(path: str | Path) -> list[tuple[int, int]]:
    """The (offset, length) runs of `path` that are not in the page cache, in order; [] when all of it is."""
    st = os.stat(path)
    size = st.st_size
    if size == 0 or not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block the thread that opens it
        return []
    if _LIBC is None:
        return [(0, size)]
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        addr = _LIBC.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            return [(0, size)]
        try:
            pages = (size + _PAGE - 1) // _PAGE
            vec = (ctypes.c_ubyte * pages)()
            if _LIBC.mincore(addr, size, vec) != 0:
                return [(0, size)]
            resident = bytes(vec).translate(_RESIDENT_BIT)  # 1 cached, 0 not (other bits are reserved)
        finally:
            _LIBC.munmap(addr, size)
    finally:
        os.close(fd)
    out: list[tuple[int, int]] = []
    page = resident.find(0)
    while page != -1:
        end = resident.find(1, page)
        end = pages if end == -1 else end
        start = page * _PAGE
        out.append((start, min(end * _PAGE, size) - start))
        page = resident.find(0, end)
    return out


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def read_into_cache(paths: list, budget: int | None = None) -> int:
    """Read the parts of `paths` that are not cached yet, within `budget` bytes (default: half the memory
    available; a file whose missing part does not fit stops the reading). Returns the bytes read."""
    budget = mem_available() // 2 if budget is None else budget
    done = 0
    chunk = bytearray(_READ_CHUNK)
    for path in paths:
        ranges = missing_ranges(path)  # [] for anything but a regular file (its size is 0): never opened here
        need = sum(length for _, length in ranges)
        if need > budget:
            return done
        if not ranges:
            continue
        budget -= need
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            view = memoryview(chunk)
            for offset, length in ranges:
                end = offset + length
                while offset < end:
                    n = os.preadv(fd, [view[:min(_READ_CHUNK, end - offset)]], offset)
                    if n <= 0:
                        break
                    offset += n
                    done += n
        finally:
            os.close(fd)
    return done
