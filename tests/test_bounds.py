"""Memory, time and threads stay bounded whatever a client, a model file or the Hub sends (issue 20): query strings,
pipelined requests that are never read, hostile GGUF headers, a trickling Hub, refused reservations of ever new
services, reservations without end, a hostile ETag, a callback receiver that answers without end, SSE clients that
stop reading, malformed requests. The memory bounds are asserted on the RSS of a real `serve` subprocess."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.server
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from model_orchestrator.platform.gpu import GpuView
from support.helpers import SidecarProcess, metric_value
from support.hf_mirror import HfMirror
from support.nvml import FakeNvml
from support.registry import model, write_registry
from support.tiny_models import write_tiny_model

HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
STATUS = b"GET /models/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory now (VmRSS) or at its peak (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)[1]) / 1024


def pipelined(port: int, requests: list[bytes], batch: int = 200) -> list[int]:
    """Send `requests` on one connection, `batch` at a time without waiting, and read every answer: their statuses."""
    statuses = []
    with socket.create_connection(("127.0.0.1", port)) as s, s.makefile("rb") as f:
        for i in range(0, len(requests), batch):
            s.sendall(b"".join(requests[i:i + batch]))
            for _ in requests[i:i + batch]:
                statuses.append(int(f.readline().split()[1]))
                length = 0
                while (line := f.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                f.read(length)
    return statuses


def gguf_value_at(data: bytes, key: str) -> int:
    """Where the value of `key` starts in a GGUF file (after its type, and for an array after its element type)."""
    raw = key.encode()
    at = data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)
    (vtype,) = struct.unpack_from("<I", data, at)
    return at + 4 + (4 if vtype == 9 else 0)


def with_string_array(src: Path, dst: Path, key: str, count: int) -> Path:
    """`src` with one more metadata entry: `key`, an array of `count` empty strings (a header that takes a while to
    read, as a real 150 000-token vocabulary does, only longer). Tensor data moves to the next alignment."""
    from model_orchestrator.files.gguf_header import read_header

    data = src.read_bytes()
    end = read_header(src).header_bytes
    start = -(-end // 32) * 32  # general.alignment: 32 by default
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    entry = struct.pack("<Q", len(key)) + key.encode() + struct.pack("<IIQ", 9, 8, count) + b"\0" * 8 * count
    head = data[:4] + struct.pack("<IQQ", version, n_tensors, n_kv + 1) + entry + data[24:end]
    dst.write_bytes(head + b"\0" * (-len(head) % 32) + data[start:])
    return dst


# ---- 2: query strings ---------------------------------------------------------------------------------------------
def test_unique_query_strings_leave_memory_as_it_was(sidecar_process):
    """/health needs no key and a web page reaches it with <img> tags: no query string may be kept."""
    sp = sidecar_process()
    pipelined(sp.port, [f"GET /health?warm={i} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode() for i in range(2000)])
    before = rss_mb(sp.proc.pid)
    unique = [f"GET /{('health', 'models/status')[i % 2]}?{i}-{os.urandom(8).hex()} HTTP/1.1\r\n"
              "Host: 127.0.0.1\r\n\r\n".encode() for i in range(12000)]
    assert set(pipelined(sp.port, unique)) == {200}
    grown = rss_mb(sp.proc.pid) - before
    assert grown < 8, f"12 000 unique query strings grew the sidecar by {grown:.1f} MB"


# ---- 6: the fast lane's back-pressure ----------------------------------------------------------------------------
def test_clients_that_pipeline_without_reading_cost_bounded_memory(sidecar_process):
    sp = sidecar_process()
    for i in range(40):  # a larger /models/status answer: more to amplify
        assert sp.call("POST", "/reservations", {"service": f"svc{i}", "vram_mb": 1})[0] == 201
    before = rss_mb(sp.proc.pid)
    flood = STATUS * 1000
    socks = []
    for _ in range(20):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", sp.port))
        s.setblocking(False)
        socks.append(s)
    try:
        stop = time.monotonic() + 3
        while time.monotonic() < stop:
            for s in socks:
                try:
                    s.send(flood)
                except BlockingIOError:  # the sidecar stopped reading us: as it should
                    pass
            time.sleep(0.01)
        grown = rss_mb(sp.proc.pid) - before
        assert sp.call("GET", "/health", timeout=10)[0] == 200
    finally:
        for s in socks:
            s.close()
    assert grown < 30, f"20 clients pipelining without reading grew the sidecar by {grown:.1f} MB"


async def test_pipelined_answers_resume_in_order_once_the_client_reads(aiohttp_client, make_orchestrator):
    """Paused while the client does not read, the lane answers the rest when it does: every answer, in order."""
    from model_orchestrator.server.api import create_app

    c = await aiohttp_client(create_app(make_orchestrator()))
    await c.get("/models/status")
    lane = c.server.runner.lane
    before = lane.answered
    n = 20000  # ~15 MB of answers: more than the sockets' buffers hold
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", c.server.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
    writer.write((STATUS + HEALTH) * (n // 2))
    await asyncio.sleep(0.5)  # it answers until the transport's writing pauses, then stops
    assert lane.answered - before < n, "every request was answered although the client read nothing"
    kinds = []
    for _ in range(n):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        body = await reader.readexactly(int(re.search(rb"Content-Length: (\d+)", head)[1]))
        kinds.append(b"loaded_models" in body)
    writer.close()
    assert kinds == [True, False] * (n // 2) and lane.answered - before == n


async def test_while_an_answer_is_built_incoming_bytes_are_capped_and_the_idle_timer_fires(aiohttp_client,
                                                                                         make_orchestrator):
    """Every thread of the default pool busy (as a stuck Hub once made them): GET /models waits for its build. The
    client pipelines 8 MB meanwhile; the lane stops reading at READ_LIMIT and closes it after the keepalive."""
    from model_orchestrator.server.api import create_app
    from model_orchestrator.server.fast_lane import READ_LIMIT

    c = await aiohttp_client(create_app(make_orchestrator()), server_kwargs={"keepalive_timeout": 0.5})
    lane = c.server.runner.lane
    loop = asyncio.get_running_loop()
    release = threading.Event()
    busy = [loop.run_in_executor(None, release.wait) for _ in range(64)]  # more than the pool has threads
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", c.server.port)
        request = b"GET /models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        writer.write(request * (8 * 1024 * 1024 // len(request)))
        await asyncio.sleep(0.3)
        conn = next(iter(lane.live))
        assert conn.building is not None
        buffered = len(conn.buf) - getattr(conn, "pos", 0)
        assert buffered <= READ_LIMIT + (1 << 18), buffered  # + one read of the transport
        try:  # closed by the lane (a reset: what it had not read was discarded), nothing answered
            assert await asyncio.wait_for(reader.read(), 10) == b""
        except ConnectionResetError:
            pass
        assert not lane.live
        writer.close()
    finally:
        release.set()
        await asyncio.gather(*busy)


# ---- 4: hostile GGUF headers --------------------------------------------------------------------------------------
def test_a_header_with_an_absurd_layer_count_is_refused_with_little_memory(tmp_path, model_dir, llama_server_bin):
    data = bytearray((model_dir / "hello.gguf").read_bytes())
    struct.pack_into("<I", data, gguf_value_at(data, "qwen3.block_count"), 100_000_000)
    (tmp_path / "hostile.gguf").write_bytes(data)
    reg = write_registry(tmp_path / "models.toml", model("tiny", path=model_dir / "hello.gguf", context_size=512),
                         model("hostile", path=tmp_path / "hostile.gguf", context_size=512))
    sp = SidecarProcess(reg, tmp_path / "state", llama_server_bin).start()
    try:
        before = rss_mb(sp.proc.pid, "VmHWM")
        status, body = sp.call("POST", "/models/estimate", {"model": "hostile"}, timeout=120)
        peak = rss_mb(sp.proc.pid, "VmHWM") - before
    finally:
        sp.stop()
    assert status == 422 and body["error"]["code"] == "unreadable_model", body
    assert "block_count" in body["error"]["message"]
    assert peak < 100, f"the estimate of a hostile header peaked {peak:.0f} MB above the sidecar's size"


@pytest.mark.parametrize("field, offset, value", [("a tensor count", 8, 1 << 60), ("a metadata count", 16, 1 << 60)])
def test_header_counts_are_checked_against_the_file(tmp_path, model_dir, field, offset, value):
    from model_orchestrator.files.gguf_header import read_header

    data = bytearray((model_dir / "hello.gguf").read_bytes())
    struct.pack_into("<Q", data, offset, value)
    (tmp_path / "x.gguf").write_bytes(data)
    with pytest.raises(ValueError, match="cannot fit"):
        read_header(tmp_path / "x.gguf")


async def test_a_slow_header_read_never_holds_up_admission(aiohttp_client, tmp_path, model_dir, llama_server_bin):
    """A load's estimate (its header read) happens before the admission lock: a reservation, which needs that lock,
    is answered while a long header is still being read."""
    from model_orchestrator.server.api import create_app
    from model_orchestrator.platform.gpu import NoGpuView
    from model_orchestrator.core.orchestrator import Orchestrator
    from model_orchestrator.files.registry import load_registry
    from model_orchestrator.platform.settings import Settings

    slow = with_string_array(model_dir / "hello.gguf", tmp_path / "slow.gguf", "test.padding", 6_000_000)
    reg = write_registry(tmp_path / "models.toml", model("tiny", path=model_dir / "hello.gguf", context_size=512),
                         model("slow", path=slow, context_size=512))
    orch = Orchestrator(Settings(state_dir=tmp_path / "state"), load_registry(reg), NoGpuView("no GPU here"),
                        llama_server_bin)
    c = await aiohttp_client(create_app(orch))
    load = asyncio.ensure_future(c.post("/models/load", json={"model": "slow", "wait": False}))
    await asyncio.sleep(0.2)  # the load is reading the header now
    r = await c.post("/reservations", json={"service": "whisperx", "vram_mb": 1})
    assert r.status == 201
    assert not load.done(), "the reservation waited for the header read"
    assert (await load).status == 202


# ---- 5: a trickling Hub -------------------------------------------------------------------------------------------
def test_a_trickling_hub_starves_nothing_and_holds_no_sigterm(tmp_path, llama_server_bin):
    tiny = write_tiny_model(tmp_path / "tiny.gguf")
    mirror = HfMirror({"test-org/Tiny-GGUF": {"tiny-Q8_0.gguf": tiny.read_bytes()}}, trickle_s=0.5).start()
    reg = write_registry(tmp_path / "models.toml", model("local", path=tiny),
                         model("hub", hf="test-org/Tiny-GGUF", file="tiny-Q8_0.gguf"))
    env = mirror.client_env(tmp_path / "hf-home", MODEL_ORCHESTRATOR_HUB_DEADLINE_S="3")
    sp = SidecarProcess(reg, tmp_path / "state", llama_server_bin, env=env).start()
    try:
        def abandoned(_):  # the client gives up after 0.3 s; the sidecar's call goes on
            try:
                sp.call("POST", "/models/estimate", {"model": "hub"}, timeout=0.3)
            except OSError:
                pass

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            list(pool.map(abandoned, range(32)))  # more than any default thread pool has threads
        for path in ("/models", "/metrics", "/models/status"):
            with urllib.request.urlopen(sp.url + path, timeout=5) as r:  # not queued behind the Hub
                assert r.status == 200, path
        assert sp.call("POST", "/models/estimate", {"model": "local"}, timeout=5)[0] == 200
        t0 = time.monotonic()
        status, body = sp.call("POST", "/models/estimate", {"model": "hub"}, timeout=30)
        assert (status, body["error"]["code"]) == (504, "hub_timeout"), body
        assert time.monotonic() - t0 < 3 + 5 and "MODEL_ORCHESTRATOR_HUB_DEADLINE_S" in body["error"]["message"]
        threading.Thread(target=abandoned, args=(0,), daemon=True).start()  # a call under way at SIGTERM
        time.sleep(0.5)
        t0 = time.monotonic()
        sp.proc.terminate()
        sp.proc.wait(timeout=10)  # well within the shutdown bound (45 s), which a stuck thread used to reach
        assert sp.proc.returncode == 0 and time.monotonic() - t0 < 10
    finally:
        sp.stop()
        mirror.stop()


# ---- 8, 9: reservations -------------------------------------------------------------------------------------------
async def test_refusals_and_odd_methods_add_no_metric_series(aiohttp_client, make_orchestrator):
    from model_orchestrator.server.api import create_app

    orch = make_orchestrator(gpu=GpuView(FakeNvml({0: []}, total_mb=1800), max_age_s=0))
    c = await aiohttp_client(create_app(orch))
    for i in range(200):
        r = await c.post("/reservations", json={"service": f"svc{i}", "vram_mb": 100_000})
        assert r.status == 409
    for method in ("PROPFIND", "MKCOL", "REPORT", "PURGE", "LINK", "SEARCH"):  # methods aiohttp parses (405)
        assert (await c.request(method, "/health")).status == 405
    text = await (await c.get("/metrics")).text()
    refusals = [line for line in text.splitlines() if line.startswith("model_orchestrator_admission_refusals_total{")]
    assert len(refusals) == len(orch.models) + 1, refusals[:5]
    assert metric_value(text, "model_orchestrator_admission_refusals_total", model="(reservation)") == 200
    methods = {m[1] for m in re.finditer(r'model_orchestrator_http_requests_total\{.*method="([^"]+)"', text)}
    assert methods <= {"GET", "POST", "other"}, methods


async def test_live_reservations_are_capped(aiohttp_client, make_orchestrator):
    from model_orchestrator.server.api import create_app

    c = await aiohttp_client(create_app(make_orchestrator(max_reservations=3)))
    ids = []
    for i in range(3):
        r = await c.post("/reservations", json={"service": f"svc{i}", "vram_mb": 1})
        assert r.status == 201
        ids.append((await r.json())["id"])
    for attempt in ({"service": "one-more", "vram_mb": 1},):
        r = await c.post("/reservations", json=attempt)
        body = await r.json()
        assert (r.status, body["error"]["code"], body["error"]["limit"]) == (409, "too_many_reservations", 3), body
        r = await c.post("/models/load", json={"model": "wan", "service": "comfyui", "vram_mb": 1})
        assert r.status == 409 and (await r.json())["error"]["code"] == "too_many_reservations"
    assert (await c.delete(f"/reservations/{ids[0]}")).status == 200
    assert (await c.post("/reservations", json={"service": "now-there-is-room", "vram_mb": 1})).status == 201


# ---- 10: a hostile Hub endpoint's ETag or commit -------------------------------------------------------------------
@pytest.mark.parametrize("hostile, command", [("etag", "estimate"), ("commit", "pull")])
def test_a_hostile_etag_or_commit_never_chooses_a_path(tmp_path, hostile, command):
    tiny = write_tiny_model(tmp_path / "tiny.gguf")
    mirror = HfMirror({"test-org/Tiny-GGUF": {"tiny-Q8_0.gguf": tiny.read_bytes()}})
    if hostile == "etag":
        mirror.etags["tiny-Q8_0.gguf"] = "../../../escaped"
    else:
        mirror.commit = "../../../../escaped"
    mirror.start()
    reg = write_registry(tmp_path / "models.toml", model("hub", hf="test-org/Tiny-GGUF", file="tiny-Q8_0.gguf"))
    env = mirror.client_env(tmp_path / "work" / "hf-home", MODEL_ORCHESTRATOR_MODELS=str(reg),
                            MODEL_ORCHESTRATOR_STATE=str(tmp_path / "work" / "state"),
                            MODEL_ORCHESTRATOR_URL="http://127.0.0.1:9")  # no sidecar: the local registry answers
    try:
        proc = subprocess.run([sys.executable, "-m", "model_orchestrator", command, "hub"], env=env,
                              capture_output=True, text=True, timeout=60)
    finally:
        mirror.stop()
    escaped = [p for p in tmp_path.rglob("*escaped*")]
    assert escaped == [], f"the Hub chose where to write: {escaped}"
    assert proc.returncode != 0 and ("ETag" if hostile == "etag" else "X-Repo-Commit") in proc.stderr, proc.stderr


# ---- 12: a callback receiver that answers without end -------------------------------------------------------------
def test_a_callback_answer_of_any_size_costs_no_memory(sidecar_process):
    sent = threading.Event()

    class Receiver(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(300 << 20))
            self.end_headers()
            chunk = b"x" * (1 << 20)
            try:
                for _ in range(300):
                    self.wfile.write(chunk)
            except OSError:
                pass  # the sidecar hung up: it reads no answer body
            sent.set()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        sp = sidecar_process(env={"MODEL_ORCHESTRATOR_CALLBACK_HOSTS": f"127.0.0.1:{port}"})
        before = rss_mb(sp.proc.pid, "VmHWM")
        status, body = sp.call("POST", "/models/load", {"model": "broken", "wait": False,
                                                        "callback_url": f"http://127.0.0.1:{port}/hook"})
        assert status == 202, body
        assert sent.wait(60), "no callback arrived"
        time.sleep(0.5)
        peak = rss_mb(sp.proc.pid, "VmHWM") - before
    finally:
        server.shutdown()
    assert peak < 50, f"a 300 MB callback answer raised the sidecar's peak by {peak:.0f} MB"


# ---- 14: SSE clients that stop reading, malformed requests, a new load's 202 ---------------------------------------
async def test_an_events_client_that_stops_reading_is_disconnected(aiohttp_client, make_orchestrator):
    from model_orchestrator.server.api import create_app

    orch = make_orchestrator(idle_timeout_s=1)
    c = await aiohttp_client(create_app(orch))
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", c.server.port))
    await loop.sock_sendall(sock, b"GET /models/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    server = c.server.runner.aiohttp_server
    for _ in range(200):
        if orch.events.subscribers:
            break
        await asyncio.sleep(0.01)
    assert orch.events.subscribers == 1 and len(server.connections) == 1
    for _ in range(300):  # ~19 MB of events the client never reads: far more than the sockets hold
        orch.events.publish("lora", model="tiny", scales={"x" * 65536: 1.0})
        await asyncio.sleep(0.002)  # the stream writes them as they come, until its writes block
    for _ in range(500):
        if not server.connections:
            break
        await asyncio.sleep(0.02)
    sock.close()
    assert not server.connections and orch.events.subscribers == 0, "a client that reads nothing is never let go"


def test_malformed_requests_do_not_flood_the_log(sidecar_process):
    sp = sidecar_process()
    for i in range(30):
        with socket.create_connection(("127.0.0.1", sp.port)) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header " + str(i).encode() + b": x\r\n\r\n")
            assert b" 400 " in s.recv(100).split(b"\r\n")[0], i
    assert sp.call("GET", "/health")[0] == 200
    log = sp.log.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    assert len(re.findall(r"WARNING .*malformed HTTP request", log)) == 1, log[-3000:]


async def test_the_202_of_a_new_load_does_not_show_the_previous_loads_time(client):
    r = await client.post("/models/load", json={"model": "tiny"})
    assert r.status == 200 and (await r.json())["load_seconds"] > 0
    assert (await client.post("/models/unload", json={"model": "tiny", "force": True})).status == 200
    r = await client.post("/models/load", json={"model": "tiny", "wait": False})
    body = await r.json()
    assert r.status == 202 and body["status"] == "loading" and body["load_seconds"] is None, body
