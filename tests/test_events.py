"""GET /models/events (server-sent events) and load callbacks, against a real llama-server."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from model_orchestrator.core.events import OVERFLOW, EventBus

from support.helpers import read_events


def types(events):
    return [(e["_event"], e.get("model"), e.get("to") or e.get("phase") or e.get("reason") or e.get("action"))
            for e in events]


async def test_stream_shows_a_load_and_an_unload_in_order_and_replays_after_reconnect(client):
    resp = await client.get("/models/events")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    r = await client.post("/models/load", json={"model": "tiny"})
    assert r.status == 200, await r.text()
    r = await client.post("/models/unload", json={"model": "tiny"})
    assert r.status == 200
    events = await read_events(resp, lambda ev: any(e["_event"] == "unloaded" for e in ev))
    resp.close()
    seen = types(events)
    assert seen == [("load_progress", "tiny", "admitted"), ("state", "tiny", "loading"),
                    ("state", "tiny", "loaded"), ("load_progress", "tiny", "ready"), ("loaded", "tiny", None),
                    ("state", "tiny", "unloading"), ("state", "tiny", "unloaded"), ("unloaded", "tiny", "request")], seen
    loaded = next(e for e in events if e["_event"] == "loaded")
    assert loaded["load_seconds"] > 0 and loaded["pid"] > 0 and loaded["id"] == loaded["_id"]
    # a client that reconnects with Last-Event-ID gets what came after it, filtered by type
    after = events[1]["_id"]  # the "loading" state change
    resp = await client.get("/models/events?types=state", headers={"Last-Event-ID": str(after)})
    replay = await read_events(resp, lambda ev: len(ev) >= 3, timeout=10)
    resp.close()
    assert [e["to"] for e in replay] == ["loaded", "unloading", "unloaded"]
    assert all(e["_id"] > after for e in replay)


async def test_failed_load_is_an_event_with_the_logs(client):
    resp = await client.get("/models/events?model=broken&types=load_failed,state")
    r = await client.post("/models/load", json={"model": "broken"})
    assert r.status == 503
    events = await read_events(resp, lambda ev: any(e["_event"] == "load_failed" for e in ev))
    resp.close()
    failed = events[-1]
    assert failed["model"] == "broken" and failed["code"] in ("process_exited", "load_failed") and failed["logs"]
    assert ("state", "broken", "failed") in types(events)


async def test_eviction_and_reservation_events_say_who_asked(client):
    orch = client.orch
    orch.settings.max_loaded = 1
    resp = await client.get("/models/events?types=evicted,reservation")
    assert (await client.post("/models/load", json={"model": "tiny"})).status == 200
    assert (await client.post("/models/load", json={"model": "tiny-tools"})).status == 200
    r = await client.post("/reservations", json={"service": "comfyui", "vram_mb": 100, "model": "wan2.1-14b"})
    rid = (await r.json())["id"]
    assert (await client.delete(f"/reservations/{rid}")).status == 200
    events = await read_events(resp, lambda ev: sum(e["_event"] == "reservation" for e in ev) >= 2)
    resp.close()
    assert events[0]["_event"] == "evicted" and events[0]["model"] == "tiny" and events[0]["by"] == "tiny-tools"
    assert [(e["action"], e["reservation"]["id"]) for e in events[1:]] == [("created", rid), ("released", rid)]


async def test_bad_filters_are_a_clear_400_and_open_no_stream(client):
    r = await client.get("/models/events?types=loaded,exploded")
    assert r.status == 400
    body = await r.json()
    assert body["error"]["code"] == "invalid_request" and "exploded" in body["error"]["message"]
    r = await client.get("/models/events", headers={"Last-Event-ID": "abc"})
    assert r.status == 400
    assert client.orch.events.subscribers == 0


async def test_a_slow_subscriber_is_cut_off_with_bounded_memory():
    bus = EventBus(max_queue=5, replay=8)
    slow = bus.subscribe()
    fast = bus.subscribe(types={"reservation"})
    for i in range(100):
        bus.publish("state", model="m", **{"from": "unloaded", "to": "loading"}, n=i)
    assert slow.queue.qsize() == 2  # what it had was dropped: only the overflow notice and the end marker remain
    assert (await slow.next(1)).type == OVERFLOW and await slow.next(1) is None
    assert fast.queue.qsize() == 0  # filtered subscribers are not charged for events they do not want
    bus.publish("reservation", action="created", reservation={})
    assert (await fast.next(1)).type == "reservation"
    # replay is bounded too, and always fits a new subscriber's queue: the last 3 events (5 minus 2 markers)
    late = bus.subscribe(last_event_id=0)
    assert late.queue.qsize() == 3 and not late.overflowed
    assert [(e.type, e.data.get("n")) for e in [late.queue.get_nowait() for _ in range(3)]] == [
        ("state", 98), ("state", 99), ("reservation", None)]
    bus.close()
    assert bus.subscribers == 0


# ---- callbacks --------------------------------------------------------------------------------------------------
@pytest.fixture
async def receiver(aiohttp_server):
    """A real HTTP endpoint that records what is POSTed to it; `fail_first` answers `fail_status` (500) that many
    times first."""
    got: list[dict] = []
    state = {"fail_first": 0, "fail_status": 500, "calls": 0}

    async def hook(request: web.Request) -> web.Response:
        state["calls"] += 1
        if state["calls"] <= state["fail_first"]:
            return web.Response(status=state["fail_status"])
        got.append(await request.json())
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app)
    server.got, server.state = got, state
    server.hook_url = f"http://127.0.0.1:{server.port}/hook"
    return server


async def wait_for(predicate, timeout=60.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_callback_gets_the_outcome_of_a_load_that_did_not_wait(client, receiver):
    client.orch.settings.callback_hosts = f"127.0.0.1:{receiver.port}"
    r = await client.post("/models/load", json={"model": "tiny", "wait": False, "callback_url": receiver.hook_url})
    assert r.status == 202, await r.text()
    await wait_for(lambda: receiver.got)
    body = receiver.got[0]
    assert body["event"] == "load_finished" and body["model"] == "tiny" and body["result"] == "loaded"
    assert body["status"] == "loaded" and body["load_seconds"] > 0 and body["pid"] == client.orch.models["tiny"].server.pid


@pytest.mark.parametrize("fail_status", [500, 409])  # 409: n8n's "execution is running already" (not waiting yet)
async def test_callback_reports_a_failure_and_is_retried(client, receiver, fail_status):
    client.orch.settings.callback_hosts = "127.0.0.1"  # any port of that host
    receiver.state["fail_first"], receiver.state["fail_status"] = 1, fail_status
    resp = await client.get("/models/events?types=callback")
    r = await client.post("/models/load", json={"model": "broken", "wait": False, "callback_url": receiver.hook_url})
    assert r.status == 202
    await wait_for(lambda: receiver.got)
    body = receiver.got[0]
    assert body["result"] == "failed" and body["status"] == "failed" and body["error"]["logs"]
    assert body["error"]["code"] in ("process_exited", "load_failed")
    events = await read_events(resp, lambda ev: len(ev) >= 1)
    resp.close()
    assert events[0]["delivered"] is True and events[0]["attempts"] == 2 and receiver.state["calls"] == 2


@pytest.mark.parametrize("hosts,url,status,code", [
    (None, "http://127.0.0.1:{port}/hook", 403, "callback_not_allowed"),  # nothing allowed unless configured
    ("n8n:5678", "http://127.0.0.1:{port}/hook", 403, "callback_not_allowed"),
    ("127.0.0.1:1", "http://127.0.0.1:{port}/hook", 403, "callback_not_allowed"),  # another port of an allowed host
    ("127.0.0.1", "file:///etc/passwd", 400, "invalid_request"),
    ("127.0.0.1", "http://user:pw@127.0.0.1:{port}/hook", 400, "invalid_request"),
])
async def test_callbacks_only_go_where_the_operator_allowed_and_nothing_starts(client, receiver, hosts, url, status,
                                                                              code):
    client.orch.settings.callback_hosts = hosts
    r = await client.post("/models/load", json={"model": "tiny", "wait": False,
                                                "callback_url": url.format(port=receiver.port)})
    assert r.status == status
    assert (await r.json())["error"]["code"] == code
    assert client.orch.models["tiny"].state == "unloaded"  # refused before anything started


async def test_callback_with_wait_true_is_refused(client, receiver):
    client.orch.settings.callback_hosts = "127.0.0.1"
    r = await client.post("/models/load", json={"model": "tiny", "callback_url": receiver.hook_url})
    assert r.status == 400 and "wait=false" in (await r.json())["error"]["message"]
    assert client.orch.models["tiny"].state == "unloaded"


async def test_shutdown_ends_open_streams(client):
    resp = await client.get("/models/events")
    await asyncio.sleep(0.05)
    assert client.orch.events.subscribers == 1
    await client.app.shutdown()  # what the runner does first on SIGTERM
    assert await asyncio.wait_for(resp.content.read(), 5) is not None  # the stream ended instead of hanging
    assert client.orch.events.subscribers == 0


async def test_a_crash_is_an_event_with_its_logs(client):
    import os
    import signal

    resp = await client.get("/models/events?types=crashed")
    assert (await client.post("/models/load", json={"model": "tiny"})).status == 200
    os.kill(client.orch.models["tiny"].server.pid, signal.SIGKILL)
    events = await read_events(resp, lambda ev: len(ev) >= 1, timeout=20)
    resp.close()
    assert events[0]["model"] == "tiny" and "SIGKILL" in events[0]["message"]
    assert (await client.post("/models/unload", json={"model": "tiny"})).status == 200
    assert client.orch.slot_cache.files("tiny") == []  # nothing saved for a model that crashed


async def test_memory_low_when_a_reservation_does_not_fit(aiohttp_client, make_orchestrator):
    from model_orchestrator.server.api import create_app
    from model_orchestrator.platform.gpu import GpuView
    from support.nvml import FakeNvml

    orch = make_orchestrator(gpu=GpuView(FakeNvml({0: []}, total_mb=1800), max_age_s=0), vram_margin_mb=200)
    c = await aiohttp_client(create_app(orch))
    resp = await c.get("/models/events?types=memory_low")
    r = await c.post("/reservations", json={"service": "comfyui", "vram_mb": 5000})
    assert r.status == 409
    events = await read_events(resp, lambda ev: len(ev) >= 1, timeout=10)
    resp.close()
    assert events[0]["model"] == "reservation:comfyui" and events[0]["missing_mb"] > 3000 and events[0]["gpu"] == 0


def test_callback_allow_list_parsing():
    from model_orchestrator.server.callbacks import check_url, parse_allowed
    from model_orchestrator.platform.errors import Refused

    assert parse_allowed("n8n:5678, localhost,[::1]:80,[fe80::1]") == [
        ("n8n", 5678), ("localhost", None), ("::1", 80), ("fe80::1", None)]
    assert check_url("http://[::1]:80/hook", "[::1]:80") == "http://[::1]:80/hook"
    assert check_url("https://Hooks.Example.com/a", "hooks.example.com")  # any port of a host given without one
    for url, hosts in (("http://n8n:5679/x", "n8n:5678"), ("https://n8n/x", "n8n:80"), ("http://evil.n8n/x", "n8n")):
        with pytest.raises(Refused):
            check_url(url, hosts)


async def test_memory_low_when_free_memory_falls_below_the_margin(aiohttp_client, make_orchestrator):
    from types import SimpleNamespace

    from model_orchestrator.server.api import create_app
    from model_orchestrator.platform.gpu import MIB, GpuView
    from support.nvml import FakeNvml

    nv = FakeNvml({0: []}, total_mb=1800)
    orch = make_orchestrator(gpu=GpuView(nv, max_age_s=0), vram_margin_mb=200)
    c = await aiohttp_client(create_app(orch))
    resp = await c.get("/models/events?types=memory_low")
    nv.procs[0].append(SimpleNamespace(pid=4_000_001, usedGpuMemory=1700 * MIB))  # another service takes it
    events = await read_events(resp, lambda ev: len(ev) >= 1, timeout=10)
    resp.close()
    assert events[0]["gpu"] == 0 and events[0]["free_mb"] == 100 and "margin" in events[0]["reason"]
    await asyncio.sleep(2.5)  # still low: not repeated every second
    assert sum(e.type == "memory_low" for e in orch.events._recent) == 1
