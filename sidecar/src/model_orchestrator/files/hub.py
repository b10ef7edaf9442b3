"""Everything that talks to the Hugging Face Hub (or any server speaking its file protocol, HF_ENDPOINT).

- `read_remote_header`: a GGUF header read with HTTP range requests (growing reads until the metadata and tensor
  infos parse: a few MB even for a 150k-token vocabulary, never the weights), cached under the state dir by the
  file's ETag (its content hash), so "will it fit?" is answered before, and without, a download.
- `download`: a pull into the shared cache (HF_HOME) with the free disk checked first and the SHA-256 checked after
  (huggingface_hub only checks the size).
- `hub_errors`: every failure of the above as one `errors.HubError` line saying what is wrong and which variable or
  command fixes it, with its code; no retries beyond one request's timeout.

It sits below model_files.py (which decides what to fetch) and above outbound.py (the threads, deadlines and the
endpoint every call goes to).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..platform import outbound
from ..platform.errors import Code, HubError
from .gguf_header import MAX_HEADER, GgufHeader, NeedMoreBytes, parse_header
from ..platform.outbound import deadline_message, endpoint

log = logging.getLogger(__name__)

# What an ETag or a commit may be: they become names of files and folders here (the header cache, blobs, snapshots),
# so a hostile endpoint must not choose a path (the Hub's are hex digests: SHA-256 of LFS files, git hashes)
_PLAIN_NAME = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z._-]{0,127}")
FIRST_READ = 1 << 20  # bytes asked for first; a small model's whole header


def _timeout() -> float:
    from huggingface_hub import constants

    return float(constants.HF_HUB_ETAG_TIMEOUT)  # HF_HUB_ETAG_TIMEOUT: seconds per request (default 10)


def _session():
    """huggingface_hub's shared HTTP client, reading under the calling thread's deadline (outbound.py)."""
    from huggingface_hub.utils import get_session

    outbound.install()
    return get_session()


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


@contextlib.contextmanager
def hub_errors(repo: str, file: str | None, revision: str):
    """Turn huggingface_hub's and httpx's exceptions into a HubError naming the fix."""
    import httpx2
    from huggingface_hub import errors

    where = f"{repo}/{file}" if file else repo
    try:
        yield
    except HubError:
        raise
    except errors.GatedRepoError:
        raise HubError(Code.HUB_GATED_REPO, f"{repo} is gated on {endpoint()}: accept its terms on the Hub with "
                       "your account and set HF_TOKEN to a token of that account") from None
    except errors.RepositoryNotFoundError as exc:
        status = exc.response.status_code if exc.response is not None else 404
        raise HubError(Code.HUB_REPO_NOT_FOUND, f"{repo} does not exist on {endpoint()} (HTTP {status}), or is "
                       "private: fix source.repo in the model registry, or set HF_TOKEN if it is private") from None
    except errors.RevisionNotFoundError:
        raise HubError(Code.HUB_REVISION_NOT_FOUND, f"{repo} has no revision {revision!r}: fix source.revision in "
                       "the model registry") from None
    except errors.RemoteEntryNotFoundError:
        raise HubError(Code.HUB_FILE_NOT_FOUND, f"{repo} has no file {file!r} at revision {revision!r}: fix "
                       "source.file / source.mmproj in the model registry") from None
    except errors.OfflineModeIsEnabled:
        raise HubError(Code.HUB_OFFLINE, f"{where} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                       "unset HF_HUB_OFFLINE, or pull the model where the Hub is reachable") from None
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status in (401, 403):
            raise HubError(Code.HUB_ACCESS_DENIED, f"{endpoint()} refused {where} (HTTP {status}): set HF_TOKEN to "
                           "a token with access to the repo") from None
        raise HubError(Code.HUB_UNAVAILABLE, f"{endpoint()} answered HTTP {status} for {where}; try again later, or "
                       "check HF_ENDPOINT") from None
    except (httpx2.TransportError, errors.LocalEntryNotFoundError, ConnectionError, TimeoutError) as exc:
        if (seconds := outbound.over_deadline()) is not None:
            raise HubError(Code.HUB_TIMEOUT, deadline_message(seconds)) from None
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HubError(Code.HUB_UNREACHABLE, f"cannot reach the Hugging Face Hub at {endpoint()} ({reason[:160]}): "
                       "check the network, or HF_ENDPOINT if you use a mirror (HF_HUB_OFFLINE=1 uses only what "
                       "HF_HOME already holds)") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise HubError(Code.INSUFFICIENT_DISK, f"the disk of the Hugging Face cache ({_hub_cache()}) filled up "
                           f"while downloading {where}: free space there, or set HF_HOME to a larger disk") from None
        raise


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


@dataclass
class FileMeta:
    etag: str  # the content's SHA-256 for LFS files (what GGUFs are)
    size: int
    commit: str | None
    url: str


def file_metadata(repo: str, file: str, revision: str) -> FileMeta:
    """One HEAD request (no retries, HF_HUB_ETAG_TIMEOUT) for the file's ETag, size and commit."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo, file, revision=revision, endpoint=endpoint())
    outbound.install()
    with hub_errors(repo, file, revision):
        meta = get_hf_file_metadata(url, timeout=_timeout(), retry_on_errors=False)
    if not meta.etag or meta.size is None:
        raise HubError(Code.HUB_BAD_RESPONSE, f"{endpoint()} gave no ETag or size for {repo}/{file}: is HF_ENDPOINT "
                       "a Hugging Face Hub (or mirror)?")
    for what, value in (("ETag", meta.etag), ("X-Repo-Commit", meta.commit_hash)):
        if value is not None and not _PLAIN_NAME.fullmatch(value):  # both name files and folders on this disk
            raise HubError(Code.HUB_BAD_RESPONSE, f"{endpoint()} gave {repo}/{file} the {what} {value[:80]!r}, "
                           "which is not a content hash: is HF_ENDPOINT a Hugging Face Hub (or mirror)?")
    return FileMeta(meta.etag, int(meta.size), meta.commit_hash, url)


# ---- header by range requests --------------------------------------------------------------------------------------
@dataclass
class RemoteHeader:
    header: GgufHeader
    read_bytes: int  # fetched from the Hub for this call (0: from the cache)


def _range(url: str, start: int, end: int, repo: str, file: str, revision: str) -> bytes:
    """Bytes start..end (inclusive) of the file, streamed and cut at what was asked, so a server ignoring Range
    costs no more than a server honouring it."""
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    headers = build_hf_headers()
    headers["Range"] = f"bytes={start}-{end}"
    headers["Accept-Encoding"] = "identity"
    want = end - start + 1
    with hub_errors(repo, file, revision):
        with _session().stream("GET", url, headers=headers, follow_redirects=True, timeout=_timeout()) as resp:
            hf_raise_for_status(resp)
            skip = start if resp.status_code == 200 else 0  # Range ignored: the body starts at byte 0
            out = bytearray()
            for chunk in resp.iter_bytes():
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                out += chunk
                if len(out) >= want:
                    break
            return bytes(out[:want])


def _cache_paths(cache_root: Path, repo: str, file: str, etag: str) -> tuple[Path, Path]:
    d = cache_root / repo.replace("/", "--") / etag
    return d / f"{file}.header", d / f"{file}.json"


def _ref_path(cache_root: Path, repo: str, revision: str, file: str) -> Path:
    return cache_root / repo.replace("/", "--") / "refs" / revision / f"{file}.json"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # one per writer
    tmp.write_bytes(data)
    tmp.replace(path)


def _from_cache(cache_root: Path, repo: str, file: str, etag: str) -> RemoteHeader | None:
    data_path, meta_path = _cache_paths(cache_root, repo, file, etag)
    try:
        meta = json.loads(meta_path.read_text())
        size = int(meta["size"])
        return RemoteHeader(parse_header(data_path.read_bytes(), f"{repo}/{file}", file_size=size), 0)
    except (OSError, ValueError, KeyError):
        return None


def read_remote_header(repo: str, file: str, revision: str, cache_root: Path) -> RemoteHeader:
    """The GGUF header of a file on the Hub, without downloading the file. Cached by ETag under `cache_root`;
    when the Hub cannot be reached, the header cached for this revision answers."""
    ref = _ref_path(cache_root, repo, revision, file)
    try:
        meta = file_metadata(repo, file, revision)
    except HubError as exc:
        if exc.code not in (Code.HUB_UNREACHABLE, Code.HUB_OFFLINE):
            raise
        with contextlib.suppress(OSError, ValueError, KeyError):
            cached = _from_cache(cache_root, repo, file, json.loads(ref.read_text())["etag"])
            if cached:
                log.info("%s/%s: Hub unreachable or offline, using the header cached for %s", repo, file, revision)
                return cached
        raise
    cached = _from_cache(cache_root, repo, file, meta.etag)
    if cached is None:
        buf = bytearray()
        want = min(FIRST_READ, meta.size)
        while True:
            more = _range(meta.url, len(buf), want - 1, repo, file, revision)
            buf += more
            try:
                header = parse_header(buf, f"{repo}/{file}", file_size=meta.size)
                break
            except NeedMoreBytes as exc:
                if not more or len(buf) >= meta.size or exc.needed > MAX_HEADER:
                    raise HubError(Code.HUB_BAD_FILE, f"{repo}/{file}: the GGUF header is truncated or longer than "
                                   f"{MAX_HEADER >> 20} MiB ({len(buf)} bytes read): is it a GGUF model?") from None
                want = min(meta.size, max(exc.needed, len(buf) + max(FIRST_READ, len(buf) // 2)))
            except ValueError as exc:
                raise HubError(Code.HUB_BAD_FILE,
                               f"{repo}/{file}: {exc}: fix source.file in the model registry") from None
        data_path, meta_path = _cache_paths(cache_root, repo, file, meta.etag)
        try:
            _write_atomic(data_path, bytes(buf[:header.header_bytes]))
            _write_atomic(meta_path, json.dumps({"size": meta.size, "commit": meta.commit}).encode())
        except OSError as exc:  # a read-only or full state dir costs a re-read next time, nothing else
            log.warning("cannot cache the header of %s/%s: %s", repo, file, exc)
        cached = RemoteHeader(header, len(buf))
    with contextlib.suppress(OSError):
        _write_atomic(ref, json.dumps({"etag": meta.etag}).encode())
    return cached


# ---- download ------------------------------------------------------------------------------------------------------
def _line_progress() -> type:
    """A tqdm that prints plain lines (at start, every 10 s, at the end) instead of redrawing a bar: for logs and
    pipes, where huggingface_hub's own bar shows nothing."""
    import sys

    from tqdm import tqdm

    class LineProgress(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.update(mininterval=10.0, file=sys.stderr)
            super().__init__(*args, **kwargs)

        def display(self, msg=None, pos=None):
            total = f"/{self.total / 1e6:.1f} MB ({100 * self.n / self.total:.0f} %)" if self.total else " MB"
            name = (self.desc or "download").rsplit("/", 1)[-1]  # huggingface_hub's desc is a shortened URL
            print(f"{name}: {self.n / 1e6:.1f}{total}", file=sys.stderr, flush=True)
            return True

        def close(self):
            if not self.disable:  # the last line, and none of tqdm's end-of-bar newlines
                self.display()
                self.disable = True
            super().close()

    return LineProgress


class DownloadCancelled(HubError):
    def __init__(self, what: str):
        super().__init__(Code.DOWNLOAD_CANCELLED, f"the download of {what} was cancelled; what arrived is kept and "
                         "the next load or pull resumes from there")


@dataclass
class DownloadProgress:
    """Where the download of one file stands (bytes done of its size; `done` starts at what an earlier, interrupted
    download left), and the cancel switch it shares with the other files of the same download: after cancel()
    the next chunk stops it. For a caller that shows progress elsewhere (status, metrics) or stops a download
    (an unload)."""

    file: str = ""
    total: int = 0
    done: int = 0
    resumed_from: int = 0
    _cancel: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


@dataclass
class DownloadPlan:
    """What a download will fetch, known before a byte is written: the files missing from the cache (with their
    Hub metadata) and the bytes still to come (less what interrupted downloads left)."""

    repo: str
    revision: str
    missing: dict[str, FileMeta]
    need_bytes: int
    partial: dict[str, int] = field(default_factory=dict)  # file -> bytes an interrupted download left


def _repo_dir(repo: str) -> Path:
    return _hub_cache() / f"models--{repo.replace('/', '--')}"


def _partial_path(repo: str, meta: FileMeta) -> Path:
    """Ours, beside huggingface_hub's blobs: kept across calls and restarts, so an interrupted download resumes
    (huggingface_hub 2.x deletes its own partial file when a call fails)."""
    return _repo_dir(repo) / "blobs" / f"{meta.etag}.partial"


def plan_download(repo: str, files: list[str], revision: str) -> DownloadPlan:
    """Metadata of the files not in the cache (one HEAD each: a dead network or a wrong name fails here, in one
    request), then the free disk against the bytes still missing: a refusal before anything is written."""
    from huggingface_hub import try_to_load_from_cache

    missing = {f: file_metadata(repo, f, revision) for f in files
               if not isinstance(try_to_load_from_cache(repo, f, revision=revision), str)}
    have = {}
    for f, meta in missing.items():
        partial = _partial_path(repo, meta)
        have[f] = min(partial.stat().st_size, meta.size) if partial.is_file() else 0
    need = sum(m.size - have[f] for f, m in missing.items())
    if need:
        cache = _hub_cache()
        probe = next((p for p in (cache, *cache.parents) if p.exists()), Path("/"))
        free = shutil.disk_usage(probe).free
        if free < need:
            raise HubError(Code.INSUFFICIENT_DISK, f"{repo}: {', '.join(missing)} need {_gb(need)} in {cache}, only "
                           f"{_gb(free)} free: free {_gb(need - free)} there, or set HF_HOME to a larger disk")
    return DownloadPlan(repo, revision, missing, need, have)


def _progress_bar(file: str, meta: FileMeta, initial: int, progress: bool):
    """A bar on a terminal, plain lines (every 10 s) otherwise, nothing with progress=False."""
    import sys

    from tqdm import tqdm

    if not progress:
        return tqdm(disable=True)
    cls = tqdm if sys.stderr.isatty() else _line_progress()
    return cls(total=meta.size, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=file)


_RESUME_TRIES = 5  # a dropped connection is resumed from the last byte this many times before giving up


def _fetch(plan: DownloadPlan, file: str, tracker: DownloadProgress, progress: bool) -> Path:
    """One file into the cache, appended to its partial file with range requests (resumed after a dropped
    connection, a cancel or a restart), checked against the Hub's SHA-256, then moved where huggingface_hub
    looks: blobs/<etag>, snapshots/<commit>/<file>, refs/<revision>."""
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    repo, meta = plan.repo, plan.missing[file]
    partial = _partial_path(repo, meta)
    blob = partial.with_name(meta.etag)
    partial.parent.mkdir(parents=True, exist_ok=True)
    locks = _hub_cache() / ".locks" / _repo_dir(repo).name  # where huggingface_hub keeps its own locks
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{meta.etag}.model-orchestrator.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one writer per file, across threads and processes
        if not blob.is_file():
            have = partial.stat().st_size if partial.is_file() else 0
            if have > meta.size:
                partial.unlink()
                have = 0
            tracker.file, tracker.total, tracker.done, tracker.resumed_from = file, meta.size, have, have
            tries = 0
            with _progress_bar(file, meta, have, progress) as bar, open(partial, "ab") as out:
                while have < meta.size:
                    headers = build_hf_headers()
                    headers["Accept-Encoding"] = "identity"
                    if have:
                        headers["Range"] = f"bytes={have}-"
                    try:
                        with _session().stream("GET", meta.url, headers=headers, follow_redirects=True,
                                               timeout=_timeout()) as resp:
                            hf_raise_for_status(resp)
                            if have and resp.status_code != 206:  # the server ignored Range: start over
                                out.truncate(0)
                                out.seek(0)
                                have = tracker.done = 0
                                bar.reset(total=meta.size)
                            for chunk in resp.iter_bytes():  # as it arrives: progress and cancel stay live
                                if tracker.cancelled:
                                    raise DownloadCancelled(f"{repo}/{file}")
                                out.write(chunk)
                                have += len(chunk)
                                tracker.done = have
                                bar.update(len(chunk))
                    except Exception as exc:  # a dropped connection mid-body: resume from the last byte
                        import httpx2

                        if tracker.cancelled:  # an unload or a shutdown stopped the read itself (outbound.py)
                            raise DownloadCancelled(f"{repo}/{file}") from None
                        tries += 1
                        if not isinstance(exc, httpx2.TransportError) or tries > _RESUME_TRIES:
                            raise
                        out.flush()
                        log.warning("%s/%s: connection lost at %d of %d bytes (%s); resuming", repo, file, have,
                                    meta.size, type(exc).__name__)
                    if have > meta.size:
                        raise HubError(Code.HUB_BAD_RESPONSE, f"{endpoint()} sent more than the {meta.size} bytes "
                                       f"it announced for {repo}/{file}; pull again, and check HF_ENDPOINT")
            _check_sha256(partial, meta, repo, file)
            partial.replace(blob)
    link = _repo_dir(repo) / "snapshots" / (meta.commit or plan.revision) / file
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        tmp = link.with_name(f".{link.name}.{os.getpid()}.{threading.get_ident()}")
        os.symlink(os.path.relpath(blob, link.parent), tmp)
        tmp.replace(link)
    if meta.commit and plan.revision != meta.commit:
        refs = _repo_dir(repo) / "refs"
        refs.mkdir(parents=True, exist_ok=True)
        _write_atomic(refs / plan.revision, meta.commit.encode())
    return link


def download(repo: str, files: list[str], revision: str, *, progress: bool = True,
             trackers: dict[str, DownloadProgress] | None = None, plan: DownloadPlan | None = None) -> list[Path]:
    """Download `files` into the shared cache (HF_HOME), a no-op for files already there: plan_download first
    (metadata, free disk), then each missing file, resumable, SHA-256 checked. Progress: a bar on a terminal,
    plain lines otherwise, and `trackers[file]` (bytes done/total, cancel) when given."""
    from huggingface_hub import try_to_load_from_cache

    plan = plan or plan_download(repo, files, revision)
    paths = []
    for f in files:
        if f in plan.missing:
            tracker = (trackers or {}).get(f) or DownloadProgress()
            with hub_errors(repo, f, revision):
                paths.append(_fetch(plan, f, tracker, progress))
        else:
            found = try_to_load_from_cache(repo, f, revision=revision)
            if not isinstance(found, str):
                raise HubError(Code.MODEL_FILES_MISSING, f"{repo}/{f} left the cache while downloading; pull again")
            paths.append(Path(found))
    return paths


def _check_sha256(path: Path, meta: FileMeta, repo: str, file: str) -> None:
    if len(meta.etag) != 64:  # not an LFS file: the ETag is a git hash, which huggingface_hub does not check either
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    if h.hexdigest() != meta.etag:
        with contextlib.suppress(OSError):
            path.unlink()
        raise HubError(Code.HUB_CHECKSUM_MISMATCH,
                       f"{repo}/{file} from {endpoint()} has SHA-256 {h.hexdigest()[:16]}…, "
                       f"the Hub says {meta.etag[:16]}…; the file was deleted: pull again, and if it repeats check "
                       "HF_ENDPOINT or the proxy between you and the Hub")
