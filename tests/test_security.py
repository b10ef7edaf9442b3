"""Security and robustness findings of issue 14 (M4 watchdog and shutdown bound, M5 one sidecar per state dir, M6
browser guard, and the lows of the API layer), each against a real sidecar: in-process over a real llama-server, or
`model-orchestrator serve` as a subprocess where the finding is about the process (signals, locks, sockets)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from support.helpers import CHAT, SidecarProcess, free_port, metric_value, pid_alive, wait_until
from support.hostile_gguf import HOSTILE_HEADERS, hostile_registry
from support.registry import model, write_registry
from model_orchestrator.core.lifecycle import MODEL_ENV, OWNER_ENV, OWNER_PID_ENV, find_leftovers

EVIL = "https://evil.example"


async def _app_client(aiohttp_client, make_orchestrator, **settings):
    from model_orchestrator.server.api import create_app

    orch = make_orchestrator(**settings)
    c = await aiohttp_client(create_app(orch))
    c.orch = orch
    return c


def _error(body: dict, code: str) -> dict:
    assert "error" in body and body["error"]["code"] == code, body
    return body["error"]


# ---- M6: a web page cannot drive or read the API without a key --------------------------------------------------
async def test_without_a_key_a_foreign_origin_is_refused_and_changes_nothing(client):
    """The finding: `Origin: https://evil.example` with a text/plain POST (no CORS preflight) -> 200 on
    /models/unload."""
    r = await client.post("/reservations", data=json.dumps({"service": "comfyui", "vram_mb": 100}),
                          headers={"Content-Type": "text/plain", "Origin": EVIL})
    assert r.status == 403, await r.text()
    err = _error(await r.json(), "origin_not_allowed")
    assert "MODEL_ORCHESTRATOR_ALLOWED_ORIGINS" in err["message"] and err["type"] == "permission_error"
    assert client.orch.reservations.active() == []  # nothing was reserved
    for path, body in (("/models/unload", {"model": "tiny"}), ("/models/load", {"model": "tiny"}),
                       ("/v1/chat/completions", {**CHAT, "model": "tiny"})):
        for origin in (EVIL, "null", "http://127.0.0.1:1"):  # another page, a sandboxed frame, another local port
            r = await client.post(path, data=json.dumps(body), headers={"Content-Type": "text/plain", "Origin": origin})
            assert r.status == 403, (path, origin, await r.text())
            _error(await r.json(), "origin_not_allowed")
    r = await client.get("/models/status", headers={"Origin": EVIL})
    assert r.status == 403
    assert client.orch.owned_pids() == {} and client.orch.models["tiny"].state.value == "unloaded"
    # the sidecar's own pages (Swagger UI's "Try it out") and clients that send no Origin (n8n, curl, the CLI) pass
    own = f"http://127.0.0.1:{client.port}"
    r = await client.post("/reservations", json={"service": "comfyui", "vram_mb": 100}, headers={"Origin": own})
    assert r.status == 201, await r.text()
    r = await client.get("/models/status")
    assert r.status == 200


async def test_allowed_origins_come_from_the_setting(aiohttp_client, make_orchestrator):
    c = await _app_client(aiohttp_client, make_orchestrator,
                          allowed_origins="http://n8n.lan:5678, https://Tools.Example/")
    for origin, expect in (("http://n8n.lan:5678", 200), ("https://tools.example", 200), (EVIL, 403),
                           ("http://n8n.lan:5679", 403), ("http://n8n.lan", 403)):
        r = await c.get("/models/status", headers={"Origin": origin})
        assert r.status == expect, origin


async def test_without_a_key_a_foreign_host_name_is_refused_dns_rebinding(client):
    """The finding: the Host header was not checked, so a page whose name was rebound to 127.0.0.1 could read
    answers."""
    for path in ("/models/status", "/health", "/models", "/openapi.json", "/docs", "/metrics/x"):
        r = await client.get(path, headers={"Host": f"evil.example:{client.port}"})
        assert r.status == 403, path
        err = _error(await r.json(), "host_not_allowed")
        assert "MODEL_ORCHESTRATOR_ALLOWED_HOSTS" in err["message"]
    for method, path in (("POST", "/models/load"), ("POST", "/v1/chat/completions"), ("POST", "/models/unload")):
        r = await client.request(method, path, json={"model": "tiny", **CHAT}, headers={"Host": "evil.example"})
        assert r.status == 403 and _error(await r.json(), "host_not_allowed"), path
    assert client.orch.owned_pids() == {}  # nothing was started
    # what a monitor scrapes, by any name (Prometheus in compose asks for llama-cpp:8000): model names and GPU
    # figures, never an answer nor a change; a page from another origin still cannot send even that
    r = await client.get("/metrics", headers={"Host": "llama-cpp:8000"})
    assert r.status == 200 and "model_orchestrator_model_state" in await r.text()
    r = await client.get("/metrics", headers={"Host": "llama-cpp:8000", "Origin": EVIL})
    assert r.status == 403
    for host in (f"127.0.0.1:{client.port}", f"localhost:{client.port}", "LOCALHOST", f"[::1]:{client.port}",
                 "192.168.1.5:8000", "app.localhost:8000"):
        r = await client.get("/models/status", headers={"Host": host})
        assert r.status == 200, host


async def test_allowed_hosts_and_an_api_key(aiohttp_client, make_orchestrator):
    c = await _app_client(aiohttp_client, make_orchestrator, allowed_hosts="llama-cpp,model-orchestrator")
    for host, expect in (("llama-cpp:8000", 200), ("model-orchestrator", 200), ("llama-cpp.evil.example", 403)):
        r = await c.get("/models/status", headers={"Host": host})
        assert r.status == expect, host
    # with a key a page cannot authenticate (the key is a header it cannot set without a preflight we never grant):
    # names and origins are then free, as for any API behind a key
    k = await _app_client(aiohttp_client, make_orchestrator, api_key="k" * 20)
    r = await k.get("/models/status", headers={"Host": "llama-cpp:8000", "Origin": EVIL,
                                               "Authorization": "Bearer " + "k" * 20})
    assert r.status == 200
    r = await k.get("/models/status", headers={"Host": "llama-cpp:8000", "Origin": EVIL})
    assert r.status == 401


# ---- lows of the API layer --------------------------------------------------------------------------------------
async def test_a_bogus_charset_is_415_not_500(client):
    for ctype, expect in (("application/json; charset=bogus", 415), ("application/json; charset=latin-1", 415),
                          ("application/json; charset=UTF-8", 201), ("application/json; charset=utf8", 201),
                          ("application/json", 201), ("text/plain", 201)):
        r = await client.post("/reservations", data=b'{"service": "x", "vram_mb": 1}', headers={"Content-Type": ctype})
        assert r.status == expect, (ctype, await r.text())
        if expect == 415:
            assert "UTF-8" in _error(await r.json(), "unsupported_charset")["message"]
    assert len(client.orch.reservations.active()) == 4


async def _raw_request(port: int, request: bytes, timeout: float = 10) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def test_an_authorization_header_that_is_not_utf8_is_401_not_500(aiohttp_client, make_orchestrator):
    c = await _app_client(aiohttp_client, make_orchestrator, api_key="right-key-0123456789")
    for value in (b"Bearer \xff\xfe\xfd", b"\xc3\x28", b"Bearer right-key-0123456789\x80"):
        answer = await _raw_request(c.port, b"GET /models/status HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: "
                                    + value + b"\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 401"), answer[:300]
        assert b'"invalid_api_key"' in answer
    r = await c.get("/models/status", headers={"Authorization": "Bearer right-key-0123456789"})
    assert r.status == 200


async def test_estimate_of_a_fifo_answers_at_once_and_never_blocks_a_worker_thread(client):
    """The finding: /models/estimate on a FIFO path blocked a worker thread forever; 8 calls hung status and metrics."""
    fifo = Path(client.orch.models["hangs"].spec.source.path)
    try:
        t0 = time.monotonic()
        answers = await asyncio.wait_for(asyncio.gather(*(client.post("/models/estimate", json={"model": "hangs"})
                                                          for _ in range(12))), 10)
        for r in answers:
            assert r.status == 422, await r.text()
            assert "not a regular file" in _error(await r.json(), "unreadable_model")["message"]
        r = await asyncio.wait_for(client.get("/models/status"), 5)
        assert r.status == 200
        r = await asyncio.wait_for(client.get("/metrics"), 5)
        assert r.status == 200
        print(f"12 estimates of a FIFO answered 422 in {time.monotonic() - t0:.3f} s; status and metrics unaffected")
    finally:  # before the fix: release the threads stuck in open() so the test run can end
        for _ in range(64):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                break


def test_openapi_bounds_are_json_schema_keywords():
    """The finding: bounds written as ge/le (ignored by JSON Schema), so schemathesis took context_size 0 as valid."""
    import jsonschema

    from model_orchestrator.server.api import dump_openapi

    doc = json.loads(dump_openapi())
    text = json.dumps(doc)
    for py in ('"ge":', '"le":', '"gt":', '"lt":'):
        assert py not in text, py
    schemas = doc["components"]["schemas"]
    validator = jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/EstimateRequest", "components": {"schemas": schemas}})
    assert not validator.is_valid({"model": "tiny", "context_size": 0})
    assert not validator.is_valid({"model": "tiny", "n_gpu_layers": -2})
    assert validator.is_valid({"model": "tiny", "context_size": 64, "n_gpu_layers": -1})
    load = jsonschema.Draft202012Validator({"$ref": "#/components/schemas/LoadRequest",
                                            "components": {"schemas": schemas}})
    assert not load.is_valid({"model": "tiny", "priority": 101})
    assert not load.is_valid({"model": "tiny", "timeout_s": 0})


def test_a_short_api_key_is_refused_for_a_non_loopback_bind(tmp_path, registry_file):
    env = {**os.environ, "MODEL_ORCHESTRATOR_HOST": "0.0.0.0", "MODEL_ORCHESTRATOR_MODELS": str(registry_file),
           "MODEL_ORCHESTRATOR_STATE": str(tmp_path / "s"), "MODEL_ORCHESTRATOR_API_KEY": "x",
           "MODEL_ORCHESTRATOR_PORT": str(free_port())}
    r = subprocess.run([sys.executable, "-m", "model_orchestrator", "serve"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "at least 16" in r.stderr, r.stderr
    assert not (tmp_path / "s").exists()  # refused before touching anything


def test_api_prefix_in_extra_args_is_refused_by_the_registry(tmp_path):
    """The finding: `--api-prefix` in extra_args moved /health, so every load timed out."""
    from model_orchestrator.files.registry import RegistryError, load_registry

    for flag in (["--api-prefix", "/x"], ["--api-prefix=/x"], ["--ssl-key-file", "k.pem"]):
        with pytest.raises(RegistryError) as exc:
            load_registry(write_registry(tmp_path / "models.toml", model("m", extra_args=flag)))
        assert flag[0].split("=")[0] in str(exc.value)


def _serve(tmp_path, registry_file, llama_server_bin, **env) -> SidecarProcess:
    return SidecarProcess(registry_file, tmp_path / "state", llama_server_bin, env=env)


def test_an_idle_or_trickling_connection_is_closed(tmp_path, registry_file, llama_server_bin):
    """The finding: no read timeout on idle connections (a client holding sockets open forever)."""
    sc = _serve(tmp_path, registry_file, llama_server_bin, MODEL_ORCHESTRATOR_IDLE_TIMEOUT_S="1").start()
    try:
        # a request line trickled a byte at a time never completes: closed after the idle timeout
        s = socket.create_connection(("127.0.0.1", sc.port))
        s.settimeout(0.2)
        t0, closed_after = time.monotonic(), None
        for b in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200:
            try:
                s.send(bytes([b]))
                if s.recv(1) == b"":
                    closed_after = time.monotonic() - t0
                    break
            except TimeoutError:
                continue
            except OSError:
                closed_after = time.monotonic() - t0
                break
        s.close()
        assert closed_after is not None and closed_after < 5, closed_after
        # a body announced and never sent: 408 once the idle timeout passes
        s = socket.create_connection(("127.0.0.1", sc.port))
        s.settimeout(10)
        s.sendall(b"POST /models/load HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"model\"")
        t0 = time.monotonic()
        answer = s.recv(4096)
        took = time.monotonic() - t0
        s.close()
        assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer, answer[:300]
        assert 0.8 < took < 5, took
        print(f"trickled request line closed after {closed_after:.2f} s; "
              f"unfinished body answered 408 after {took:.2f} s")
    finally:
        sc.stop()


# ---- M5: one sidecar per state directory ------------------------------------------------------------------------
def test_a_second_serve_with_the_same_state_dir_refuses_and_touches_nothing(tmp_path, registry_file, llama_server_bin):
    """The finding: a second `serve` reaped the running sidecar's llama-server as a leftover, then failed on the
    port."""
    first = _serve(tmp_path, registry_file, llama_server_bin).start()
    try:
        status, body = first.call("POST", "/models/load", {"model": "tiny"})
        assert status == 200, body
        pid = body["pid"]
        second = _serve(tmp_path, registry_file, llama_server_bin)
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "model_orchestrator", "serve"], env=second.env, capture_output=True,
                           text=True, timeout=60)
        took = time.monotonic() - t0
        assert r.returncode == 3, r.stderr
        assert f"PID {first.proc.pid}" in r.stderr and first.url in r.stderr, r.stderr
        assert pid_alive(pid)
        status, body = first.call("GET", "/models/status")
        assert body["loaded_models"]["tiny"]["status"] == "loaded" and body["loaded_models"]["tiny"]["pid"] == pid
        status, body = first.call("POST", "/v1/chat/completions", {**CHAT, "model": "tiny"})
        assert status == 200
        print(f"second serve refused in {took:.2f} s: {r.stderr.strip()}")
    finally:
        first.stop()
    # the lock goes with its holder: a new sidecar starts on the same state dir
    again = _serve(tmp_path, registry_file, llama_server_bin).start()
    again.stop()
    assert again.proc.returncode == 0


def test_only_processes_whose_sidecar_is_gone_are_leftovers(tmp_path):
    state = str((tmp_path / "state").resolve())
    owner = subprocess.Popen(["sleep", "60"])  # stands for a running sidecar
    gone = subprocess.Popen(["true"])
    gone.wait()
    kids = {}
    try:
        for name, owner_pid in (("live-owner", owner.pid), ("dead-owner", gone.pid), ("no-owner-pid", None)):
            env = {**os.environ, OWNER_ENV: state, MODEL_ENV: name}
            if owner_pid is not None:
                env[OWNER_PID_ENV] = str(owner_pid)
            kids[name] = subprocess.Popen(["sleep", "60"], env=env)
        wait_until(lambda: len(find_leftovers(state)) >= 2, 5)
        assert sorted(find_leftovers(state)) == sorted([kids["dead-owner"].pid, kids["no-owner-pid"].pid])
        owner.kill()
        owner.wait()
        assert sorted(find_leftovers(state)) == sorted(k.pid for k in kids.values())
    finally:
        for p in (owner, *kids.values()):
            p.kill()
            p.wait()


# ---- M4: a frozen llama-server, and SIGTERM with children that do not answer -----------------------------------
async def test_a_frozen_llama_server_is_marked_failed_and_killed(aiohttp_client, make_orchestrator):
    c = await _app_client(aiohttp_client, make_orchestrator, health_interval_s=0.2, health_timeout_s=0.3,
                          health_misses=2)
    r = await c.post("/models/load", json={"model": "tiny"})
    assert r.status == 200
    slot = c.orch.models["tiny"]
    pid = slot.server.pid
    await asyncio.sleep(0.8)
    assert slot.state.value == "loaded"  # answering: no false alarm
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        while slot.state.value != "failed" and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.02)
        detected = time.monotonic() - t0
        assert slot.state.value == "failed", "a frozen llama-server stayed loaded"
        assert slot.last_error["code"] == "health_timeout", slot.last_error
        for _ in range(100):
            if not pid_alive(pid):
                break
            await asyncio.sleep(0.02)
        assert not pid_alive(pid), "the frozen process was left running"
        metrics = await (await c.get("/metrics")).text()
        assert metric_value(metrics, "model_orchestrator_model_failures_total", model="tiny",
                            code="health_timeout") == 1
        assert metric_value(metrics, "model_orchestrator_health_misses_total", model="tiny") >= 2
    finally:
        with_pid = pid_alive(pid)
        if with_pid:
            os.kill(pid, signal.SIGKILL)
    r = await c.post("/v1/chat/completions", json={**CHAT, "model": "tiny"})
    assert r.status == 200 and slot.state.value == "loaded" and slot.server.pid != pid
    print(f"SIGSTOPped llama-server marked failed and killed {detected:.2f} s after the freeze "
          "(interval 0.2 s, timeout 0.3 s, 2 misses)")


def test_sigterm_finishes_within_its_bound_while_a_request_waits_on_a_frozen_llama_server(tmp_path, registry_file,
                                                                                          llama_server_bin):
    """The finding: SIGSTOP llama-server, chat, SIGTERM the sidecar: still running after 115 s."""
    from model_orchestrator.cli import shutdown_bound_s
    from model_orchestrator.platform.settings import Settings

    env = {"MODEL_ORCHESTRATOR_SHUTDOWN_TIMEOUT_S": "2", "MODEL_ORCHESTRATOR_STOP_TIMEOUT_S": "1"}
    bound = shutdown_bound_s(Settings(shutdown_timeout_s=2, stop_timeout_s=1))
    sc = _serve(tmp_path, registry_file, llama_server_bin, **env).start()
    pid = None
    try:
        status, body = sc.call("POST", "/models/load", {"model": "tiny"})
        assert status == 200, body
        pid = body["pid"]
        os.kill(pid, signal.SIGSTOP)
        waiter = threading.Thread(target=lambda: _swallow(sc.call, "POST", "/v1/chat/completions",
                                                          {**CHAT, "model": "tiny"}, timeout=120), daemon=True)
        waiter.start()
        time.sleep(1.0)  # the chat is in flight, waiting on the frozen process
        t0 = time.monotonic()
        sc.proc.send_signal(signal.SIGTERM)
        try:
            sc.proc.wait(bound + 5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the sidecar was still running {bound + 5:g} s after SIGTERM")
        took = time.monotonic() - t0
        assert took <= bound + 1, took
        assert wait_until(lambda: not pid_alive(pid), 5) is not None, "llama-server outlived the sidecar"
        print(f"SIGTERM with a request on a frozen llama-server: exited in {took:.2f} s (bound {bound:g} s), "
              f"exit code {sc.proc.returncode}")
    finally:
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        sc.stop()


def _swallow(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except Exception:
        pass


# ---- background loops -------------------------------------------------------------------------------------------
async def test_background_loops_survive_exceptions_logged_and_counted(aiohttp_client, make_orchestrator, caplog):
    """Each loop's step raises a few times; the loop logs, counts and goes on running the real step."""
    from model_orchestrator.server.api import create_app

    orch = make_orchestrator(health_interval_s=0.1)
    fails = {"idle": 2, "health": 3}
    ran_after = {"idle": 0, "health": 0}

    def failing(name, real, exc):
        async def step():
            if fails[name]:
                fails[name] -= 1
                raise exc
            ran_after[name] += 1
            await real()
        return step

    # before start(): the loops take their steps then
    dog = orch.watchdog
    dog.unload_idle_step = failing("idle", dog.unload_idle_step, RuntimeError("boom in the idle loop"))
    dog.check_health = failing("health", dog.check_health, KeyError("boom in the health loop"))
    c = await aiohttp_client(create_app(orch))
    for _ in range(200):
        if ran_after["idle"] >= 2 and ran_after["health"] >= 2:
            break
        await asyncio.sleep(0.05)
    assert ran_after["idle"] >= 2 and ran_after["health"] >= 2, ran_after
    metrics = await (await c.get("/metrics")).text()
    assert metric_value(metrics, "model_orchestrator_background_errors_total", loop="idle") == 2
    assert metric_value(metrics, "model_orchestrator_background_errors_total", loop="health") == 3
    assert "boom in the idle loop" in caplog.text
    assert len(orch._background) == 2 and not any(t.done() for t in orch._background)  # both loops still run


def test_the_shutdown_deadline_kills_the_children_and_exits_when_the_graceful_path_is_stuck(tmp_path):
    """The last resort of the bound: cli._exit_deadline's timer, armed at shutdown, fires in a process whose graceful
    shutdown never finishes (here: a main thread that never returns), SIGKILLs the llama-server process groups it
    owns and exits with code 1 at the bound."""
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)  # stands for a llama-server ignoring SIGTERM
    code = f"""
import asyncio, logging, time
from model_orchestrator.cli import _exit_deadline, shutdown_bound_s
from model_orchestrator.platform.settings import Settings

class Orch:
    settings = Settings(shutdown_timeout_s=0.5, stop_timeout_s=0.5)
    def owned_pids(self):
        return {{{child.pid}: "tiny"}}

asyncio.run(_exit_deadline(Orch(), logging.getLogger("t"))(None))
print(shutdown_bound_s(Orch.settings), flush=True)
time.sleep(60)  # a shutdown that never finishes
"""
    try:
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        took = time.monotonic() - t0
        bound = float(r.stdout.split()[0])
        assert r.returncode == 1, r
        assert bound <= took < bound + 3, (took, bound)
        assert wait_until(lambda: child.poll() is not None, 5) is not None, "the child was not killed"
        assert child.returncode == -signal.SIGKILL
        print(f"stuck shutdown: forced exit after {took:.2f} s (bound {bound:g} s), child killed")
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


# ---- issue 20: the remaining 500s (findings 7, 11, 13) -----------------------------------------------------------
async def test_every_hostile_header_shape_is_422_unreadable_model(aiohttp_client, tmp_path, llama_server_bin):
    """The finding: ten header shapes gave 500 internal_error on /models/estimate (only ValueError and OSError were
    caught); the same estimate refuses a Hub model's load before its download in GPU mode."""
    from model_orchestrator.server.api import create_app
    from model_orchestrator.platform.gpu import NoGpuView
    from model_orchestrator.core.orchestrator import Orchestrator
    from model_orchestrator.files.registry import load_registry
    from model_orchestrator.platform.settings import Settings

    orch = Orchestrator(Settings(state_dir=tmp_path / "state"), load_registry(hostile_registry(tmp_path)),
                        NoGpuView("tests run without a GPU"), llama_server_bin)
    c = await aiohttp_client(create_app(orch))
    r = await c.post("/models/estimate", json={"model": "good"})
    assert r.status == 200, await r.text()  # the base header is fine: each variant breaks one thing
    for i, name in enumerate(HOSTILE_HEADERS):
        r = await c.post("/models/estimate", json={"model": f"hostile-{i}"})
        body = await r.json()
        assert r.status == 422, (name, body)
        assert body["error"]["code"] == "unreadable_model" and "GGUF header" in body["error"]["message"], (name, body)
    metrics = await (await c.get("/metrics")).text()
    assert 'status="500"' not in metrics


async def test_last_event_id_that_is_no_event_number_is_400(client):
    """The finding: `Last-Event-ID: ²` (a digit to str.isdigit, not to int) and 5 000 digits gave 500."""
    for value in ("²", "٣", "1" * 5000, "12a", "-1"):
        r = await client.get("/models/events", headers={"Last-Event-ID": value})
        assert r.status == 400, (value[:20], await r.text())
        assert "Last-Event-ID" in _error(await r.json(), "invalid_request")["message"]
        r = await client.get("/models/events", params={"last_event_id": value})
        assert r.status == 400, value[:20]


async def test_a_callback_url_with_a_malformed_port_is_400(aiohttp_client, make_orchestrator):
    c = await _app_client(aiohttp_client, make_orchestrator, callback_hosts="127.0.0.1")
    for url in ("http://127.0.0.1:99999/hook", "http://127.0.0.1:port/hook", "http://127.0.0.1:-1/hook",
                "http://[::1/hook"):
        r = await c.post("/models/load", json={"model": "tiny", "wait": False, "callback_url": url})
        assert r.status == 400, (url, await r.text())
        _error(await r.json(), "invalid_request")
    assert c.orch.models["tiny"].state.value == "unloaded"  # refused before anything started


async def test_a_lora_name_that_is_a_list_or_an_object_is_400(client):
    for name in (["terse"], {"a": 1}, 3, None):
        r = await client.post("/v1/chat/completions", json={**CHAT, "model": "tiny", "lora": [{"name": name,
                                                                                               "scale": 1}]})
        assert r.status == 400, (name, await r.text())
        assert "lora.0" in _error(await r.json(), "invalid_request")["message"]
    assert client.orch.models["tiny"].state.value == "unloaded"


@pytest.mark.parametrize("kind", ["a file", "under a file", "read-only"])
def test_a_state_dir_that_cannot_be_used_is_a_one_line_error(tmp_path, registry_file, kind):
    """The finding: a read-only or non-directory state dir crashed `serve` with a traceback."""
    env = {**os.environ, "MODEL_ORCHESTRATOR_MODELS": str(registry_file), "MODEL_ORCHESTRATOR_PORT": str(free_port())}
    cmd = [sys.executable, "-m", "model_orchestrator", "serve"]
    (tmp_path / "afile").write_text("x")
    state = {"a file": tmp_path / "afile", "under a file": tmp_path / "afile" / "state",
             "read-only": tmp_path / "ro"}[kind]
    shared = None
    if kind == "read-only" and os.geteuid() == 0:  # root writes anywhere: run as nobody, for whom it is read-only
        import shutil
        import tempfile

        shared = Path(tempfile.mkdtemp(prefix="ro-state-"))  # pytest's own tmp dirs are closed to other users
        shared.chmod(0o755)
        env["MODEL_ORCHESTRATOR_MODELS"] = str(shutil.copy(registry_file, shared / "models.toml"))
        state = shared / "ro"
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    if kind == "read-only":
        state.mkdir()
        state.chmod(0o555)
    env["MODEL_ORCHESTRATOR_STATE"] = str(state)
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    finally:
        if shared is not None:
            shutil.rmtree(shared)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(state) in lines[0] and "MODEL_ORCHESTRATOR_STATE" in lines[0], lines[0]
