"""Swap on demand, the cap's own refusal code, idempotent unloads, and the races of the unloading window, with real
llama-servers (CPU mode: the cap on loaded models is what forces swaps here; memory swaps are in test_admission)."""

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from support.helpers import ChildSampler, pid_alive

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def llama_pids(owner: str) -> set[int]:
    """llama-server processes of the sidecar whose state dir is `owner` (their environment carries it)."""
    from model_orchestrator.core.lifecycle import find_leftovers

    return {p for p in find_leftovers(owner) if pid_alive(p)}


@pytest.fixture
async def capped(aiohttp_client, make_orchestrator):
    """A sidecar with MODEL_ORCHESTRATOR_MAX_LOADED=1 and everything else default (swap on demand on)."""
    from model_orchestrator.server.api import create_app

    orch = make_orchestrator(max_loaded=1)
    c = await aiohttp_client(create_app(orch))
    c.orch = orch
    yield c


async def chat(c, model):
    r = await c.post("/v1/chat/completions", json={**CHAT, "model": model})
    return r.status, await r.json()


async def test_chats_for_two_models_swap_on_demand_under_a_cap_of_one(capped):
    c = capped
    with ChildSampler(os.getpid()) as sampler:
        for i in range(6):
            model = ("tiny", "tiny-tools")[i % 2]
            status, body = await chat(c, model)
            assert status == 200, body
            loaded = [m.id for m in c.orch.models.values() if m.state.value == "loaded"]
            assert loaded == [model]
    assert sampler.max_alive == 1, "two llama-servers were alive at once"
    text = await (await c.get("/metrics")).text()
    assert "model_orchestrator_model_unloads_total{model=\"tiny\",reason=\"evicted\"} 3.0" in text


async def test_an_explicit_load_says_what_it_swapped_out(capped):
    c = capped
    assert (await c.post("/models/load", json={"model": "tiny"})).status == 200
    r = await c.post("/models/load", json={"model": "tiny-tools"})
    body = await r.json()
    assert r.status == 200 and body["result"] == "loaded" and body["evicted"] == ["tiny"], body


async def test_strict_when_asked_per_request_and_the_cap_has_its_own_code(capped):
    c = capped
    await c.post("/models/load", json={"model": "tiny"})
    r = await c.post("/models/load", json={"model": "tiny-tools", "allow_eviction": False})
    err = (await r.json())["error"]
    assert r.status == 409 and err["code"] == "too_many_models", err
    assert err["evictable"] == ["tiny"] and "MODEL_ORCHESTRATOR_MAX_LOADED" in err["message"]
    assert c.orch.models["tiny"].state.value == "loaded" and c.orch.models["tiny-tools"].state.value == "unloaded"


async def test_strict_when_configured_globally(aiohttp_client, make_orchestrator):
    from model_orchestrator.server.api import create_app

    orch = make_orchestrator(max_loaded=1, swap_on_demand=False)
    c = await aiohttp_client(create_app(orch))
    assert (await chat(c, "tiny"))[0] == 200
    status, body = await chat(c, "tiny-tools")
    assert status == 409 and body["error"]["code"] == "too_many_models"
    models = {m["id"]: m for m in (await (await c.get("/models")).json())["models"]}
    assert models["tiny"]["swap_on_demand"] is False


async def test_higher_priority_stays_protected_and_a_busy_model_drains_before_its_swap(capped):
    c = capped
    await c.post("/models/load", json={"model": "tiny", "priority": 50})
    status, body = await chat(c, "tiny-tools")  # priority 0 may never evict priority 50: refused at once
    assert status == 409 and body["error"]["code"] == "too_many_models", body
    await c.post("/models/unload", json={"model": "tiny"})
    await c.post("/models/load", json={"model": "tiny"})
    tiny = c.orch.models["tiny"]
    tiny.acquire()  # a request in flight: tiny is never evicted under it
    waiting = asyncio.create_task(chat(c, "tiny-tools"))
    for _ in range(100):
        if (await (await c.get("/models/status")).json())["queues"].get("tiny-tools"):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    assert not waiting.done() and tiny.state.value == "loaded", "a busy model was swapped out"
    models = {m["id"]: m for m in (await (await c.get("/models")).json())["models"]}
    queue = models["tiny-tools"]["queue"]
    assert queue["length"] == 1 and queue["oldest_wait_s"] >= 0.3, queue
    status = await (await c.get("/models/status")).json()
    assert status["loaded_models"]["tiny"]["queue"] == {"length": 0, "oldest_wait_s": None}
    tiny.release()  # drained: now it goes, and the waiting request is answered
    status, body = await asyncio.wait_for(waiting, 30)
    assert status == 200, body
    assert tiny.state.value == "unloaded" and c.orch.models["tiny-tools"].state.value == "loaded"


async def test_the_load_priority_override_ends_with_its_process(capped):
    c = capped
    await c.post("/models/load", json={"model": "tiny", "priority": 50})
    assert c.orch.models["tiny"].priority == 50
    await c.post("/models/unload", json={"model": "tiny"})
    assert c.orch.models["tiny"].priority == 0
    # a refused load leaves no override behind either
    await c.post("/models/load", json={"model": "tiny-tools", "priority": 90})
    r = await c.post("/models/load", json={"model": "tiny", "priority": 5, "allow_eviction": False})
    assert r.status == 409 and c.orch.models["tiny"].priority == 0


async def test_unloading_what_is_not_held_is_a_result_not_an_error(client):
    r = await client.post("/models/unload", json={"model": "tiny"})
    assert (r.status, (await r.json())["result"]) == (200, "not_loaded")
    r = await client.post("/models/unload", json={"model": "wan2.1-14b"})
    body = await r.json()
    assert r.status == 200 and body["result"] == "not_held" and body["status"] == "not_held", body
    r = await client.post("/reservations", json={"service": "comfyui", "model": "wan2.1-14b", "vram_mb": 100})
    assert r.status == 201
    r = await client.post("/models/unload", json={"model": "wan2.1-14b"})
    assert (await r.json())["result"] == "released"


async def test_a_reservation_does_not_count_against_the_model_cap(capped):
    """M2: a 1 MB reservation under a cap of one evicted the loaded model."""
    c = capped
    await c.post("/models/load", json={"model": "tiny"})
    r = await c.post("/reservations", json={"service": "whisperx", "vram_mb": 1})
    assert r.status == 201, await r.text()
    assert c.orch.models["tiny"].state.value == "loaded"


async def test_a_load_right_after_an_unload_waits_for_the_old_process_to_exit(aiohttp_client, make_orchestrator):
    """M1: a model being unloaded still counts (cap and memory) until its process has exited. Its llama-server is
    stopped (SIGSTOP) so it cannot act on SIGTERM: the unload takes the stop timeout (8 s here: long enough that a
    loaded machine still sees it unloading) before the SIGKILL, and a load of another model made meanwhile must wait
    instead of starting a second llama-server."""
    from model_orchestrator.server.api import create_app

    orch = make_orchestrator(max_loaded=1, stop_timeout_s=8)
    c = await aiohttp_client(create_app(orch))
    c.orch = orch
    await c.post("/models/load", json={"model": "tiny-random"})
    old = c.orch.models["tiny-random"].server.pid
    os.kill(old, signal.SIGSTOP)
    with ChildSampler(os.getpid()) as sampler:
        unload = asyncio.create_task(c.post("/models/unload", json={"model": "tiny-random", "save_slots": False}))
        deadline = time.monotonic() + 5  # the unload's request reaches the sidecar (a loaded machine may take a while)
        while c.orch.models["tiny-random"].state.value == "loaded" and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert c.orch.models["tiny-random"].state.value == "unloading"
        r = await c.post("/models/load", json={"model": "tiny"})
        assert r.status == 200, await r.text()
        assert not pid_alive(old), "the new model started while the old process was alive"
        await unload
    assert sampler.max_alive == 1, "two llama-servers were alive at once"


async def test_an_unload_during_the_spawn_leaves_no_process(client):
    """L1: an unload that cancels a load inside the spawn must not leave a child that nobody waits for."""
    owner = client.orch.owner
    for delay in (0, 0.001, 0.003, 0.006, 0.01):
        load = asyncio.create_task(client.post("/models/load", json={"model": "tiny"}))
        await asyncio.sleep(delay)
        await client.post("/models/unload", json={"model": "tiny", "force": True})
        await load
        if client.orch.models["tiny"].state.value == "unloaded":
            assert not llama_pids(owner), f"a llama-server outlived the cancelled load (delay {delay})"
        await client.post("/models/unload", json={"model": "tiny", "force": True})
        assert not llama_pids(owner)


async def test_no_load_starts_once_shutdown_began(make_orchestrator):
    from model_orchestrator.platform.errors import Code, Refused

    orch = make_orchestrator()
    await orch.start()
    await orch.ensure_loaded("tiny")
    pid = orch.models["tiny"].server.pid
    closing = asyncio.create_task(orch.close())
    await asyncio.sleep(0)
    with pytest.raises(Refused) as refused:
        await orch.ensure_loaded("tiny-tools")
    assert refused.value.code == Code.SHUTTING_DOWN
    await closing
    assert not pid_alive(pid) and all(m.state.value == "unloaded" for m in orch.models.values())
    assert not orch._background  # the idle loop was cancelled and awaited


def test_the_orchestrator_knows_nothing_of_http():
    """Refusals are Refused values with a code: nothing below server/ imports aiohttp.web or names a status."""
    src = Path(__file__).resolve().parents[1] / "sidecar" / "src" / "model_orchestrator"
    below = [p for layer in ("core", "files", "platform") for p in (src / layer).glob("*.py")]
    assert len(below) > 30
    for path in below:
        text = path.read_text()
        assert "aiohttp import web" not in text and "import http_errors" not in text \
            and ".http_errors import" not in text, path.name
        assert "ApiError" not in text and "status=4" not in text and "status=5" not in text, path.name
    orchestrator = (src / "core" / "orchestrator.py").read_text()
    assert "\nimport aiohttp" not in orchestrator and "\nfrom aiohttp" not in orchestrator  # only for type hints


async def test_wait_false_answers_202_once_the_load_is_admitted_and_started(capped):
    """A wait:false 202 used to report status "unloaded"; and a refusal must still be an error, not a 202."""
    c = capped
    r = await c.post("/models/load", json={"model": "tiny", "wait": False})
    body = await r.json()
    assert r.status == 202 and body["result"] == "loading" and body["status"] in ("loading", "loaded"), body
    r = await c.post("/models/load", json={"model": "tiny-tools", "wait": False, "allow_eviction": False})
    assert r.status == 409 and (await r.json())["error"]["code"] == "too_many_models"
    for _ in range(500):
        if c.orch.models["tiny"].state.value == "loaded":
            break
        await asyncio.sleep(0.02)
    assert c.orch.models["tiny"].state.value == "loaded"
