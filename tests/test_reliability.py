"""Faults, load and access: the orchestrator stays consistent, nothing is lost or leaked.

Complements test_api.py / test_process.py (kill -9 of llama-server and of the sidecar, leftovers, load timeout,
bad input) with: the crash-to-failed figure and reload after a crash mid-stream with memory back in the budget,
missing model files and a full disk (nothing spawned), the load timeout set from the environment, the load test's
CI variant (bench/load_test.py), constant-time key comparison, loopback-only llama-servers and no secret in any
log, answer or child environment."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from support.helpers import CHAT, bench_module, pid_alive, read_sse, tcp_listening
from support.registry import fixture_models, model, write_registry
from model_orchestrator.platform.gpu import GpuView
from model_orchestrator.files.tiny_gguf import HELLO_TEXT
from support.nvml import FakeNvml

load_test = bench_module("load_test")
percentile = load_test.percentile


@pytest.fixture
def registry_file(tmp_path, model_dir) -> Path:
    """The fixture registry plus a model whose file does not exist."""
    return write_registry(tmp_path / "models.toml", *fixture_models(model_dir),
                          model("missing", path=tmp_path / "nowhere" / "gone.gguf", context_size=512))


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


# ---- faults -----------------------------------------------------------------------------------------------------
@pytest.fixture
async def gpu_client(aiohttp_client, make_orchestrator):
    """A sidecar over the stand-in GPU: 1800 MB, each model ~1000 MB, 200 MB margin (one model fits)."""
    from model_orchestrator.server.api import create_app

    orch = make_orchestrator(gpu=GpuView(FakeNvml({0: []}, total_mb=1800), max_age_s=0), cuda_overhead_mb=1000,
                             vram_margin_mb=200)
    c = await aiohttp_client(create_app(orch))
    c.orch = orch
    yield c


async def test_kill_9_mid_stream_fails_the_model_within_1_s_frees_its_memory_and_the_next_request_reloads(gpu_client):
    c = gpu_client
    r = await c.post("/models/load", json={"model": "tiny-random"})
    assert r.status == 200
    st = await (await c.get("/models/status")).json()
    free_before_load = 1800 - 200
    assert st["gpus"][0]["available_mb"] < free_before_load - 900  # the model's estimate is held
    r = await c.post("/v1/chat/completions", json={**CHAT, "model": "tiny-random", "stream": True,
                                                   "max_tokens": 3000, "ignore_eos": True})
    assert r.status == 200
    await r.content.readuntil(b"\n\n")  # streaming
    slot = c.orch.models["tiny-random"]
    pid = slot.server.pid
    t0 = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    while slot.state.value != "failed" and time.perf_counter() - t0 < 1.0:
        await asyncio.sleep(0.002)
    noticed_ms = (time.perf_counter() - t0) * 1000
    assert slot.state.value == "failed", "crash not noticed within 1 s"
    events = await read_sse(r)
    client_ms = (time.perf_counter() - t0) * 1000
    assert events[-1] != "[DONE]" and events[-1]["error"]["code"] == "model_crashed", events[-1]
    assert not pid_alive(pid) and c.orch.owned_pids() == {}
    st = await (await c.get("/models/status")).json()
    assert st["loaded_models"]["tiny-random"]["status"] == "failed"
    assert st["gpus"][0]["available_mb"] == free_before_load  # its memory is back in the budget
    t1 = time.perf_counter()
    r = await c.post("/v1/chat/completions", json={**CHAT, "model": "tiny-random", "max_tokens": 8})
    reload_ms = (time.perf_counter() - t1) * 1000
    assert r.status == 200 and (await r.json())["choices"][0]["message"]["content"]
    assert slot.state.value == "loaded" and slot.server.pid != pid and slot.last_error is None
    print(f"kill -9 mid-stream: model failed after {noticed_ms:.1f} ms, client's error event after {client_ms:.1f} ms, "
          f"next request reloaded and answered in {reload_ms:.0f} ms")


async def test_a_registry_path_that_does_not_exist_is_409_and_nothing_is_spawned(client):
    for path, body in (("/models/load", {"model": "missing"}), ("/models/estimate", {"model": "missing"}),
                       ("/v1/chat/completions", {**CHAT, "model": "missing"})):
        r = await client.post(path, json=body)
        err = (await r.json())["error"]
        assert r.status == 409 and err["code"] == "model_files_missing" and "gone.gguf" in err["message"], (path, err)
    assert client.orch.owned_pids() == {} and children(os.getpid()) == []
    assert client.orch.models["missing"].state.value == "unloaded"
    models = {m["id"]: m for m in (await (await client.get("/models")).json())["models"]}
    assert models["missing"]["files_present"] is False


def _mount_tiny_tmpfs(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


async def test_a_generated_model_on_a_full_disk_is_a_clear_error_with_nothing_spawned_or_left(client, tmp_path):
    """The generated models' folder on a 64 KiB tmpfs (root), else made unwritable by a file in its way."""
    gen_dir = client.orch.settings.generated_dir
    mounted = _mount_tiny_tmpfs(gen_dir)
    if not mounted:
        gen_dir.rmdir()
        gen_dir.write_text("a file where the directory should be")
    try:
        for _ in range(2):  # the second attempt finds the same clean state
            r = await client.post("/models/load", json={"model": "tiny-generated"})
            err = (await r.json())["error"]
            assert r.status == 409 and err["code"] == "model_files_missing", err
            assert "cannot write the generated model" in err["message"], err
            assert not mounted or "KiB free there" in err["message"], err
        r = await client.post("/v1/chat/completions", json={**CHAT, "model": "tiny-generated"})
        assert r.status == 409
        assert client.orch.owned_pids() == {} and children(os.getpid()) == []
        assert client.orch.models["tiny-generated"].state.value == "unloaded"
        if mounted:
            assert list(gen_dir.iterdir()) == []  # no partial file left behind
        print(f"full disk ({'tmpfs 64 KiB' if mounted else 'unwritable dir'}): {err['message']}")
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(gen_dir)], check=False)
    r = await client.post("/models/load", json={"model": "tiny"})  # the rest of the registry is unaffected
    assert r.status == 200


# ---- load -------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_load_ci_variant_keeps_every_invariant(tmp_path):
    """bench/load_test.py, shorter: 50 clients for 8 s; a small queue so overload answers are exercised too."""
    run, _ = load_test.run_load(50, 8, workdir=tmp_path, max_queue=2)
    print(load_test.table(run, 50, 8))
    assert run.violations == [], run.violations
    assert run.max_instances == 1 and run.max_committed_mb <= run.budget_mb
    assert percentile(run.process_gaps_ms, 50) <= 5, "processes were not sampled every <= 5 ms"
    outcomes = {o for (_, o) in run.counts}
    assert "200" in outcomes and any(o.startswith("503 queue_full") for o in outcomes), run.counts
    assert not any(o.startswith(("500", "502", "exception")) for o in outcomes)
    assert sum(n for (op, _), n in run.counts.items() if op == "stream") > 50


async def test_a_full_queue_answers_503_queue_full_with_retry_after(aiohttp_client, make_orchestrator):
    from model_orchestrator.server.api import create_app

    orch = make_orchestrator(max_queue=1)
    c = await aiohttp_client(create_app(orch))
    body = {**CHAT, "model": "tiny-random", "max_tokens": 400, "ignore_eos": True}
    # 12 at once while tiny-random loads: its 4 slots plus MODEL_ORCHESTRATOR_MAX_QUEUE=1 may wait, 7 are refused
    answers = await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(12)))
    statuses = sorted(r.status for r in answers)
    over = [r for r in answers if r.status == 503]
    assert statuses.count(200) == 5 and len(over) == 7, statuses
    for r in over:
        err = (await r.json())["error"]
        assert int(r.headers["Retry-After"]) >= 1 and err["code"] == "queue_full" and err["limit"] == 5, err
    assert orch.models["tiny-random"].in_flight == 0


# ---- access -----------------------------------------------------------------------------------------------------
async def test_api_key_is_compared_in_constant_time(aiohttp_client, make_orchestrator, monkeypatch):
    from model_orchestrator.server import api

    src = inspect.getsource(api.api_key_guard)
    assert "hmac.compare_digest" in src and "==" not in src.split("compare_digest", 1)[1].split("\n", 1)[0]
    calls = []
    real = api.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(api.hmac, "compare_digest", spy)
    orch = make_orchestrator(api_key="s3cret-key")
    c = await aiohttp_client(api.create_app(orch))
    for header, expect in ((None, 401), ("Bearer s3cret-ke", 401), ("Bearer s3cret-keyX", 401),
                           ("bearer s3cret-key", 401), ("Bearer s3cret-key", 200)):
        r = await c.get("/models/status", headers={"Authorization": header} if header else {})
        assert r.status == expect, header
    # one comparison per request, two for a refusal the fast lane hands to aiohttp (both ask the same guard); the
    # comparison is hmac.compare_digest's, whose time does not depend on where the bytes differ (its own contract)
    assert 5 <= len(calls) <= 10 and all(isinstance(a, bytes) and b == b"Bearer s3cret-key" for a, b in calls)


def test_llama_servers_listen_on_a_private_socket_only_and_no_secret_leaks(sidecar_process, tmp_path):
    """No TCP port at all (issue 20: a web page found a child's loopback port and used it): each llama-server
    listens on a Unix socket in a directory only this user may enter, and asks a key of its own, given in its
    environment (never argv, never an answer, never the log)."""
    key, token = "key-ZQ8fW2vLr0", "hf_SECRETtokenXYZ123"
    sc = sidecar_process(env={"MODEL_ORCHESTRATOR_API_KEY": key, "HF_TOKEN": token,
                              "MODEL_ORCHESTRATOR_LOAD_TIMEOUT_S": "1.5", "MODEL_ORCHESTRATOR_LOG_LEVEL": "DEBUG"})
    auth = {"Authorization": f"Bearer {key}"}

    def call(method, path, body=None, headers=auth):
        import json as _json
        import urllib.request

        req = urllib.request.Request(sc.url + path, method=method,
                                     headers={"Content-Type": "application/json", **headers},
                                     data=_json.dumps(body).encode() if body is not None else None)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    answers = []
    status, data = call("GET", "/models/status", headers={"Authorization": f"Bearer {key[:-1]}"})  # failed auth
    assert status == 401
    answers.append(data)
    status, data = call("GET", "/models/status", headers={"Authorization": f"Bearer {token}"})
    assert status == 401
    answers.append(data)
    # the load timeout comes from MODEL_ORCHESTRATOR_LOAD_TIMEOUT_S (no timeout_s in the request)
    t0 = time.monotonic()
    status, data = call("POST", "/models/load", {"model": "hangs"})
    took = time.monotonic() - t0
    assert status == 503 and b"load_timeout" in data and b'"logs"' in data, data
    assert 1.4 < took < 8, took
    answers.append(data)
    pids = []
    for model_id in ("tiny", "tiny-tools"):
        status, data = call("POST", "/models/load", {"model": model_id})
        assert status == 200, data
        answers.append(data)
        pids.append(__import__("json").loads(data)["pid"])
    status, data = call("POST", "/v1/chat/completions", {**CHAT, "model": "tiny"})
    assert status == 200 and HELLO_TEXT.encode() in data
    answers.append(data)
    for path in ("/models/tiny/logs?lines=10000", "/models/hangs/logs?lines=10000", "/models/status", "/models",
                 "/metrics", "/health"):
        status, data = call("GET", path)
        assert status == 200, path
        answers.append(data)
    child_keys = []
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        sock = Path(cmdline[cmdline.index(b"--host") + 1].decode())
        assert sock.suffix == ".sock" and sock.is_socket() and b"--port" not in cmdline, cmdline
        assert sock.parent == tmp_path / "state" / "sockets" and (sock.parent.stat().st_mode & 0o777) == 0o700
        assert tcp_listening(pid) == []
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert key.encode() not in environ and token.encode() not in environ
        assert b"HF_TOKEN=" not in environ and b"MODEL_ORCHESTRATOR_API_KEY=" not in environ
        child_key = next(v for v in environ.split(b"\0") if v.startswith(b"LLAMA_API_KEY="))[14:]
        assert len(child_key) >= 32 and child_key not in b"\0".join(cmdline)
        child_keys.append(child_key)
    assert child_keys[0] != child_keys[1]  # one key per child
    listening = {pid: tcp_listening(pid) for pid in pids}
    sc.stop()
    log = sc.log.read_bytes()
    assert b"hangs" in log  # the log was written (the failed load is in it)
    for blob in (*answers, log):
        assert key.encode() not in blob and token.encode() not in blob
        assert not any(k in blob for k in child_keys)
    print(f"llama-servers' TCP listeners: {listening}; load timeout from the environment after {took:.2f} s; "
          f"{len(answers)} answers and {len(log)} bytes of sidecar log free of both secrets and the children's keys")
