"""A tiny stand-in for the Hugging Face Hub's file protocol (what huggingface_hub's hf_hub_download speaks), for
tests that set HF_ENDPOINT to it.

Serves, from {repo: {filename: bytes or Path}} (a Path is read range by range: a sparse 16 GiB synthetic model
costs neither memory nor disk):
  HEAD/GET /{org}/{name}/resolve/{revision}/{filename}
      ETag (the content's SHA-256, as the Hub gives LFS files; for a Path, `etags[filename]` or a hash of its
      name, size and mtime), X-Repo-Commit, Content-Length, Accept-Ranges;
      GET honours `Range: bytes=N-` and `bytes=N-M` (206 + Content-Range): how huggingface_hub resumes and how
      headers are read without downloading.
  GET /api/models/{org}/{name}[/revision/{revision}]   {"id", "sha", "siblings": [{"rfilename"}]}
  A repo not served answers like the Hub: 401 with X-Error-Code RepoNotFound; a file not served 404 EntryNotFound.
Every request is recorded (method, path, Range header, body bytes sent) so tests can count what was downloaded.
Fault injection: `cut_once[filename] = n` makes the next GET of that file announce the whole length, send only
n bytes and drop the connection (an interrupted download); `gated = {repo}` answers 401 GatedRepo unless the
request carries `Authorization: Bearer <one of tokens>`; `corrupt = {filename}` sends other bytes than the ETag
announces (a bad checksum); `rate[filename] = bytes/s` sends it slowly (a download one can watch and cancel);
`trickle_s = t` sends the head of every file answer one byte every t seconds (a Hub that never quite times out).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    status: int = 0
    body_bytes: int = 0


@dataclass
class HfMirror:
    repos: dict[str, dict[str, bytes]]
    commit: str = COMMIT
    requests: list[Request] = field(default_factory=list)
    cut_once: dict[str, int] = field(default_factory=dict)
    gated: set[str] = field(default_factory=set)
    tokens: set[str] = field(default_factory=set)
    corrupt: set[str] = field(default_factory=set)
    etags: dict[str, str] = field(default_factory=dict)
    rate: dict[str, float] = field(default_factory=dict)  # filename -> bytes per second (a slow download)
    trickle_s: float = 0.0  # > 0: a file answer's head goes out one byte every trickle_s seconds

    def _etag(self, filename: str, data) -> str:
        if filename in self.etags:
            return self.etags[filename]
        if isinstance(data, Path):
            st = data.stat()
            self.etags[filename] = hashlib.sha256(f"{data}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
            return self.etags[filename]
        self.etags[filename] = hashlib.sha256(data).hexdigest()
        return self.etags[filename]

    def body_bytes(self) -> int:
        """Bytes of file contents sent so far."""
        return sum(r.body_bytes for r in self.file_gets())

    def start(self) -> "HfMirror":
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def end_headers(self):
                if not (mirror.trickle_s and "/resolve/" in self.path):
                    return super().end_headers()
                self._headers_buffer.append(b"\r\n")
                head, self._headers_buffer = b"".join(self._headers_buffer), []
                try:
                    for i in range(len(head)):  # until the client gives up (the write then fails)
                        self.wfile.write(head[i:i + 1])
                        self.wfile.flush()
                        time.sleep(mirror.trickle_s)
                except OSError:
                    self.close_connection = True

            def do_GET(self):
                self._serve(body=True)

            def _send_json(self, rec: Request, obj) -> None:
                data = json.dumps(obj).encode()
                rec.status = 200
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(data)

            def _not_found(self, rec: Request, status: int = 404, code: str = "EntryNotFound") -> None:
                rec.status = status
                data = json.dumps({"error": code}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(data)

            def _serve(self, body: bool) -> None:
                path = self.path.split("?", 1)[0]
                rec = Request(self.command, path, self.headers.get("Range"))
                mirror.requests.append(rec)
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
                if m and m.group(1) in mirror.repos:
                    files = mirror.repos[m.group(1)]
                    return self._send_json(rec, {"id": m.group(1), "sha": mirror.commit,
                                                 "siblings": [{"rfilename": f} for f in files]})
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if not m or m.group(1) not in mirror.repos:
                    return self._not_found(rec, 401, "RepoNotFound")
                auth = self.headers.get("Authorization") or ""
                if m.group(1) in mirror.gated and auth.removeprefix("Bearer ") not in mirror.tokens:
                    return self._not_found(rec, 401 if not auth else 403, "GatedRepo")
                if m.group(3) not in mirror.repos[m.group(1)]:
                    return self._not_found(rec)
                filename = m.group(3)
                data = mirror.repos[m.group(1)][filename]
                size = data.stat().st_size if isinstance(data, Path) else len(data)
                start, end = 0, size - 1
                rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
                if rng and body:
                    start = int(rng.group(1))
                    end = min(int(rng.group(2)), size - 1) if rng.group(2) else size - 1
                partial = (start, end) != (0, size - 1)
                rec.status = 206 if partial else 200
                self.send_response(rec.status)
                self.send_header("ETag", f'"{mirror._etag(filename, data)}"')
                self.send_header("X-Repo-Commit", mirror.commit)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(end + 1 - start))
                if partial:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                if not body:
                    return
                if isinstance(data, Path) or filename in mirror.rate:  # streamed in pieces (at `rate` if set)
                    return self._stream(rec, data, start, end, mirror.rate.get(filename))
                chunk = data[start:end + 1]
                if filename in mirror.corrupt:
                    chunk = bytes(b ^ 0xFF for b in chunk[:64]) + chunk[64:]
                cut = mirror.cut_once.pop(filename, None)
                if cut is not None and not partial:
                    self.wfile.write(chunk[:cut])
                    self.wfile.flush()
                    rec.body_bytes = cut
                    self.close_connection = True
                    self.connection.shutdown(2)  # the client sees a short body: an interrupted download
                    return
                self.wfile.write(chunk)
                rec.body_bytes = len(chunk)

            def _stream(self, rec: Request, data, start: int, end: int, rate: float | None) -> None:
                piece = 64 << 10
                pos = start
                with (open(data, "rb") if isinstance(data, Path) else contextlib.nullcontext()) as f:
                    while pos <= end:
                        n = min(piece, end + 1 - pos)
                        if f is not None:
                            f.seek(pos)
                            chunk = f.read(n)
                        else:
                            chunk = data[pos:pos + n]
                        try:
                            self.wfile.write(chunk)
                            self.wfile.flush()
                        except OSError:  # the client went away (a cancelled download)
                            return
                        pos += n
                        rec.body_bytes += n
                        if rate:
                            time.sleep(n / rate)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def client_env(self, hf_home: Path, **extra: str) -> dict[str, str]:
        """This process's environment for a sidecar or CLI whose Hub is this mirror: no inherited HF_* or
        MODEL_ORCHESTRATOR_* variables, HF_HOME = hf_home, plus `extra`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODEL_ORCHESTRATOR_"))}
        env.update(HF_HOME=str(hf_home), HF_ENDPOINT=self.url, HF_HUB_DISABLE_TELEMETRY="1", **extra)
        return env

    def file_gets(self) -> list[Request]:
        """GET requests for file contents (what counts as downloading)."""
        return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path]
