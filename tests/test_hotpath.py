"""The hot path (issue 12): status answers from a snapshot, metrics without sharing mutable state across threads,
the thin proxy's limits (timeouts, hang-ups, llama-server's 500s, remote image URLs), readiness by push."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from datetime import datetime, timezone
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web

from model_orchestrator.platform.gpu import GpuView
from model_orchestrator.core.lifecycle import READY_FALLBACK_POLL_S, LlamaServer
from support.nvml import FakeNvml, proc

PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


class CountingNvml(FakeNvml):
    """Counts full device walks (one nvmlDeviceGetMemoryInfo per device per snapshot)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.walks = 0

    def nvmlDeviceGetMemoryInfo(self, h):
        self.walks += 1
        return super().nvmlDeviceGetMemoryInfo(h)


async def test_status_is_served_from_a_snapshot_and_changes_show_at_once(aiohttp_client, make_orchestrator):
    from model_orchestrator.server.api import STATUS, create_app

    nv = CountingNvml({0: [proc(4242, 700)]}, total_mb=24000)
    orch = make_orchestrator(gpu=GpuView(nv, max_age_s=0), gpu_sample_s=0.2)
    c = await aiohttp_client(create_app(orch))
    first = await (await c.get("/models/status")).read()
    walks, builds = nv.walks, c.app[STATUS].builds
    bodies = await asyncio.gather(*(c.get("/models/status") for _ in range(100)))
    assert {await r.read() for r in bodies} == {first}  # the same serialised answer ...
    assert nv.walks - walks <= 2, "requests read NVML: only the sampler may"  # ... without an NVML walk each
    assert c.app[STATUS].builds - builds <= 2
    # a model state change is visible in the very next answer, not after a sampling period
    orch.reservations.add("whisperx", 1000, ttl_s=60)
    st = await (await c.get("/models/status")).json()
    assert [r["service"] for r in st["reservations"]] == ["whisperx"]
    # a new GPU reading shows within one sampling period
    nv.procs[0].append(proc(5151, 300))
    await asyncio.sleep(0.5)
    st = await (await c.get("/models/status")).json()
    assert st["gpus"][0]["foreign_mb"] == 1000, st["gpus"][0]
    h1 = await (await c.get("/health")).read()
    assert h1 == await (await c.get("/health")).read()
    assert (await c.get("/models")).status == 200


async def test_a_change_of_any_field_status_shows_is_in_the_next_answer(aiohttp_client, make_orchestrator):
    """The status cache keys on the orchestrator's revision, which every change of a model's fields bumps: a
    hand-kept list of fields lagged up to a sampling period for a field it missed (here the estimate and loaded_at)."""
    from model_orchestrator.server.api import create_app

    orch = make_orchestrator(gpu_sample_s=60)  # only a change may rebuild an answer here, never its age
    c = await aiohttp_client(create_app(orch))
    assert (await c.post("/models/load", json={"model": "tiny"})).status == 200
    model = orch.models["tiny"]
    before = (await (await c.get("/models/status")).json())["loaded_models"]["tiny"]
    model.estimate = SimpleNamespace(total_mb=4321.0)  # as admission sets it
    model.loaded_at = datetime(2020, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    after = (await (await c.get("/models/status")).json())["loaded_models"]["tiny"]
    assert (after["estimate_mb"], after["loaded_at"]) == (4321.0, "2020-01-02T03:04:05+00:00"), (before, after)


async def test_metrics_scrapes_never_touch_state_off_the_loop_under_reservation_churn(client):
    """M3: /metrics rendered in a worker thread while the loop mutated the reservation book (9 of 5463 scrapes
    answered 500). Now the loop copies what a scrape shows; the thread formats only that copy."""
    orch = client.orch
    loop_thread = threading.get_ident()
    off_loop = []
    active = orch.reservations.active

    def watched_active():
        if threading.get_ident() != loop_thread:
            off_loop.append(threading.current_thread().name)
        return active()

    orch.reservations.active = watched_active
    stop = False

    async def churn():
        n = 0
        while not stop:
            for _ in range(50):
                orch.reservations.add(f"svc{n % 7}", 10, ttl_s=0.001 * (n % 5 + 1))
                n += 1
            orch.reservations.expire()
            await asyncio.sleep(0)
        return n

    task = asyncio.create_task(churn())
    statuses = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3:
        r = await client.get("/metrics")
        statuses.append(r.status)
        await r.read()
    stop = True
    made = await task
    assert made > 2000 and len(statuses) > 50
    assert set(statuses) == {200}, statuses
    assert off_loop == [], f"the reservation book was read off the event loop in {set(off_loop)}"
    text = await (await client.get("/metrics")).text()
    assert "model_orchestrator_reservation_bytes" in text and "model_orchestrator_gpu_available 0.0" in text


async def test_cheap_validation_keeps_the_clear_400s(client):
    for body, field in (({"messages": [{"content": "no role"}]}, "messages.0.role"),
                        ({"messages": ["text"]}, "messages.0"),
                        ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
                        ({"messages": {"role": "user"}}, "messages"),
                        ({}, "messages")):
        r = await client.post("/v1/chat/completions", json={"model": "tiny", **body})
        err = (await r.json())["error"]
        assert r.status == 400 and err["code"] == "invalid_request" and err["problems"][0]["field"] == field, err
    r = await client.post("/v1/completions", json={"model": "tiny"})
    assert r.status == 400 and (await r.json())["error"]["problems"][0]["field"] == "prompt"
    r = await client.post("/v1/chat/completions", data=b"[" * 100000, headers={"Content-Type": "application/json"})
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"
    assert all(s.state.value == "unloaded" for s in client.orch.models.values())  # nothing spawned


async def test_a_silent_llama_server_ends_the_request_with_504_after_the_idle_timeout(aiohttp_client, make_orchestrator):
    """M4: upstream requests had no read timeout: a wedged llama-server held the client forever."""
    from model_orchestrator.server.api import create_app

    orch = make_orchestrator(upstream_idle_timeout_s=1.5)
    c = await aiohttp_client(create_app(orch))
    r = await c.post("/models/load", json={"model": "tiny"})
    pid = (await r.json())["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
                         timeout=aiohttp.ClientTimeout(total=20))
        body = await r.json()
        assert r.status == 504 and body["error"]["code"] == "upstream_timeout", body
        assert 1.4 < time.monotonic() - t0 < 10
        # what happened, and what to do: the bound that ran out, the token limit in force, the three ways out
        err = body["error"]
        assert "sent nothing for 1.5 s (MODEL_ORCHESTRATOR_UPSTREAM_IDLE_TIMEOUT_S)" in err["message"], err
        assert "2048 tokens, the model's max_tokens" in err["message"] and '"stream": true' in err["message"], err
        assert (err["phase"], err["timeout_s"], err["max_tokens"], err["model"]) == ("answer", 1.5, 2048, "tiny"), err
        r = await c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 5,
                                                       "messages": [{"role": "user", "content": "hi"}]},
                         timeout=aiohttp.ClientTimeout(total=20))
        assert r.status == 504 and "this request's limit: 5 tokens" in (await r.json())["error"]["message"]
        r = await c.post("/v1/chat/completions", json={"model": "tiny", "stream": True,
                                                       "messages": [{"role": "user", "content": "hi"}]},
                         timeout=aiohttp.ClientTimeout(total=20))
        err = (await r.json())["error"]
        assert r.status == 504 and err["phase"] == "stream" and "sent no token for 1.5 s before the first" in \
            err["message"], err
    finally:
        os.kill(pid, signal.SIGCONT)
    for _ in range(5):  # the model serves again once it runs (the idle timeout is short for a busy host)
        r = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        if r.status == 200:
            break
    assert r.status == 200


@pytest.mark.parametrize("stream", [True, False])
async def test_a_client_hanging_up_is_counted_499_without_an_error(client, caplog, stream):
    """Low: a client hanging up was counted 502 (or 500) with a traceback."""
    caplog.set_level(logging.ERROR)
    body = {"model": "tiny", "stream": stream, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    r = await client.post("/v1/chat/completions", json={**body, "stream": False})
    assert r.status == 200
    slot = client.orch.models["tiny"]
    os.kill(slot.server.pid, signal.SIGSTOP)  # the answer is surely not there when the client leaves
    try:
        async with aiohttp.ClientSession() as s:
            with pytest.raises(asyncio.TimeoutError):
                await s.post(str(client.make_url("/v1/chat/completions")), json=body,
                             timeout=aiohttp.ClientTimeout(total=0.5))
        await asyncio.sleep(0.2)
    finally:
        os.kill(slot.server.pid, signal.SIGCONT)
    for _ in range(200):
        if slot.in_flight == 0:
            break
        await asyncio.sleep(0.05)
    assert slot.in_flight == 0
    text = await (await client.get("/metrics")).text()
    lines = [line for line in text.splitlines() if line.startswith("llamacpp_requests_total{") and '"tiny"' in line]
    assert any('status="499"' in line for line in lines), lines
    assert not any(f'status="{s}"' in line for line in lines for s in (500, 502)), lines
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status == 200  # the model serves the next request
    await r.read()


async def test_llama_servers_500_for_a_bad_request_becomes_a_clear_400(client):
    """Low: llama-server answers requests it cannot take with a 500 (here: grammar and json_schema together)."""
    r = await client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "grammar": 'root ::= "a"',
        "json_schema": {"type": "object"}})
    body = await r.json()
    assert r.status == 400 and body["error"]["code"] == "rejected_by_llama_server", body
    assert "json_schema" in body["error"]["message"] and body["error"]["upstream_status"] == 500
    assert client.orch.models["tiny"].state.value == "loaded"


@pytest.fixture
async def image_host(aiohttp_server):
    """A web server on loopback that serves a PNG and records who fetched it."""
    hits = []

    async def png(request):
        hits.append(request.headers.get("User-Agent", ""))
        import base64
        return web.Response(body=base64.b64decode(PNG_B64), content_type="image/png")

    app = web.Application()
    app.router.add_get("/cat.png", png)
    server = await aiohttp_server(app)
    server.hits = hits
    return server


def _image_chat(url: str) -> dict:
    return {"model": "tiny-vision", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"}, {"type": "image_url", "image_url": {"url": url}}]}]}


async def test_remote_image_urls_are_refused_unless_allowed_and_never_fetched_by_llama_server(
        aiohttp_client, make_orchestrator, image_host):
    """M7: an http:// image_url made llama-server fetch it (blind SSRF from the model's process)."""
    from model_orchestrator.server.api import create_app

    url = str(image_host.make_url("/cat.png"))
    c = await aiohttp_client(create_app(make_orchestrator()))
    r = await c.post("/v1/chat/completions", json=_image_chat(url))
    body = await r.json()
    assert r.status == 400 and body["error"]["code"] == "image_url_not_allowed", body
    assert image_host.hits == []
    r = await c.post("/v1/chat/completions", json=_image_chat(f"data:image/png;base64,{PNG_B64}"))
    assert r.status == 200  # data URLs pass as before

    c2 = await aiohttp_client(create_app(make_orchestrator(image_url_hosts=f"example.org, {image_host.host}")))
    r = await c2.post("/v1/chat/completions", json=_image_chat(url))
    assert r.status == 200, await r.text()
    assert len(image_host.hits) == 1 and "aiohttp" in image_host.hits[0].lower(), image_host.hits  # the sidecar's


async def test_readiness_comes_from_llama_servers_log_with_one_health_check(client):
    """Readiness by push: no /health poll loop while the model loads."""
    await client.get("/health")
    calls = []
    real_request = LlamaServer.request

    def counting_request(self, method, path, *a, **kw):
        if path == "/health":
            calls.append(path)
        return real_request(self, method, path, *a, **kw)

    LlamaServer.request = counting_request
    try:
        r = await client.post("/models/load", json={"model": "tiny"})
    finally:
        LlamaServer.request = real_request
    assert r.status == 200
    took = (await r.json())["load_seconds"]
    # the hint's one check, plus the slow safety-net polls a load this long allows (a 10 ms poll made ~100 per s)
    assert 1 <= len(calls) <= 2 + took / READY_FALLBACK_POLL_S, f"{len(calls)} /health requests in a {took:.2f} s load"
