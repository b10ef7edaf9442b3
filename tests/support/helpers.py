"""Helpers the tests share: process checks, a real sidecar subprocess, Prometheus parsing (registries:
support/registry.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def bench_module(name: str):
    """A script of bench/ as a module (the load test and the synthetic real-shape models are shared with tests)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


from model_orchestrator.core.lifecycle import process_alive as pid_alive  # noqa: E402  the product's own check


def tcp_listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of the TCP sockets `pid` listens on, from /proc/net/tcp{,6} and its fds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # LISTEN
                addr, port = f[1].split(":")
                if width == 8:
                    ip = ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
                else:
                    ip = "v6:" + addr
                out.append((ip, int(port, 16)))
    return out


def child_endpoint(pid: int) -> tuple[str, str]:
    """A sidecar's llama-server as a process of the same user can reach it (tests, benchmarks): the Unix socket of
    its argv (--host) and the key of its environment (LLAMA_API_KEY). Another user can read neither."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    key = next(v for v in environ if v.startswith(b"LLAMA_API_KEY="))
    return argv[argv.index(b"--host") + 1].decode(), key.split(b"=", 1)[1].decode()


def child_session(pid: int, key: bool = True):
    """An aiohttp session to a sidecar's llama-server (child_endpoint), with its key unless key=False; URLs are
    `http://llama-server/<path>`."""
    import aiohttp

    sock, api_key = child_endpoint(pid)
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock, limit=0, keepalive_timeout=4),
                                 headers={"Authorization": f"Bearer {api_key}"} if key else None)


def child_call(pid: int, method: str, path: str, body: dict | None = None, key: bool = True,
               headers: dict | None = None, timeout: float = 900) -> tuple[int, dict, dict]:
    """One blocking request to a sidecar's llama-server (child_endpoint): (status, JSON body, response headers)."""
    import http.client

    sock, api_key = child_endpoint(pid)

    class UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(sock)

    conn = UnixConnection("llama-server", timeout=timeout)
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if key else {}),
         **(headers or {})}
    try:
        conn.request(method, path, body=json.dumps(body).encode() if body is not None else None, headers=h)
        r = conn.getresponse()
        raw = r.read()
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {"raw": raw.decode(errors="replace")}
        return r.status, data, dict(r.getheaders())
    finally:
        conn.close()


def stop_process(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds; nothing for a process already gone."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_until(predicate, timeout: float, interval: float = 0.01) -> float | None:
    """Seconds until predicate() was true, or None on timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(interval)
    return None


def wait_for(predicate, timeout: float = 60.0, what: str = "condition", interval: float = 0.05):
    """predicate()'s first true value, polled every `interval`; AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := predicate():
            return got
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class SidecarProcess:
    """`model-orchestrator serve` as a real subprocess, for tests that kill it."""

    command = [sys.executable, "-m", "model_orchestrator", "serve"]

    def __init__(self, registry: Path, state_dir: Path, llama_bin: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "MODEL_ORCHESTRATOR_STATE": str(state_dir), "LLAMA_SERVER_BIN": str(llama_bin),
                    "MODEL_ORCHESTRATOR_MODELS": str(registry), "MODEL_ORCHESTRATOR_PORT": str(self.port),
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log = state_dir.parent / f"sidecar-{self.port}.log"

    def start(self, timeout: float = 30) -> "SidecarProcess":
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        if wait_until(self._healthy, timeout, 0.05) is None:
            self.stop()
            raise AssertionError(f"sidecar did not start:\n{self.log.read_text()[-3000:]}")
        return self

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"sidecar exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, method=method, headers={"Content-Type": "application/json"},
                                     data=json.dumps(body).encode() if body is not None else None)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc, 20)


def metric_value(text: str, name: str, **labels) -> float | None:
    """The value of one sample in Prometheus text format (labels given must match; others are ignored)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


async def read_sse(resp) -> list:
    """Events of an SSE response, in order, as they arrive."""
    events, buf = [], b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if event.startswith(b"data: "):
                data = event[6:]
                events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return events


class ChildSampler:
    """Counts a process's live llama-server children every `interval_s` in a background thread (zombies, which
    have exited and hold no memory, do not count). `max_alive` is the most seen at once; `gaps_ms` the time between
    samples, to show the sampling was as fine as claimed. /proc is listed each time but only children are re-read
    (a full scan takes ~5 ms on the 2-core VM)."""

    def __init__(self, parent_pid: int, interval_s: float = 0.002, name: bytes = b"llama-server"):
        import threading

        self.parent, self.interval, self.name = parent_pid, interval_s, name
        self.max_alive, self.samples, self.gaps_ms, self.seen_pids = 0, 0, [], set()
        self._ppid: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _stat(self, pid: int) -> tuple[int, bytes, bytes] | None:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            return None
        comm = raw[raw.index(b"(") + 1:raw.rindex(b")")]
        state, ppid = raw.rsplit(b")", 1)[1].split()[:2]
        return int(ppid), comm, state

    def sample(self) -> int:
        alive = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            if self._ppid.get(pid, self.parent) != self.parent:
                continue  # known not to be a child (pids are not reused within a test)
            st = self._stat(pid)
            if st is None:
                continue
            self._ppid[pid] = st[0]
            if st[0] == self.parent and st[1] == self.name and st[2] != b"Z":
                alive += 1
                self.seen_pids.add(pid)
        return alive

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            self.max_alive = max(self.max_alive, self.sample())
            self.samples += 1
            now = time.monotonic()
            self.gaps_ms.append((now - last) * 1000)
            last = now
            time.sleep(self.interval)

    def __enter__(self) -> "ChildSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


async def read_events(resp, until, timeout: float = 60.0) -> list[dict]:
    """Parse an SSE stream until `until(events)` is true; returns the events (data objects with `_event`, `_id`)."""
    events: list[dict] = []
    block: dict = {}

    async def run():
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if not line:
                if "data" in block:
                    data = json.loads(block["data"])
                    data["_event"], data["_id"] = block.get("event"), int(block["id"])
                    events.append(data)
                    if until(events):
                        return
                block.clear()
                continue
            if line.startswith(":"):
                continue
            key, _, value = line.partition(": ")
            block[key] = value

    await asyncio.wait_for(run(), timeout)
    return events
