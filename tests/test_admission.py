"""Admission, eviction and reservations through the HTTP API, with real llama-servers. The GPU is NVML's API played
by a stand-in (tests/support/nvml.py) so memory can be scarce on purpose; the same paths ran on a real GPU (test_gpu.py's
`gpu` tests, results/)."""

import asyncio

import pytest

from support.helpers import metric_value
from model_orchestrator.platform.gpu import GpuView
from support.nvml import FakeNvml

# Every tiny model is estimated at ~1000 MB by pretending each llama-server costs 1000 MB of CUDA overhead;
# the card has 1800 MB and 200 MB stay free: one model fits, two do not.
# Swap on demand is off here: these tests check the strict rules (equal priorities only with allow_eviction); the
# default (swap on) has its own tests below.
SETTINGS = dict(cuda_overhead_mb=1000, vram_margin_mb=200, swap_on_demand=False)


@pytest.fixture
async def gpu_client(aiohttp_client, make_orchestrator):
    from model_orchestrator.server.api import create_app

    nv = FakeNvml({0: []}, total_mb=1800)
    orch = make_orchestrator(gpu=GpuView(nv, max_age_s=0), **SETTINGS)
    c = await aiohttp_client(create_app(orch))
    c.orch, c.nv = orch, nv
    yield c


async def post(c, path, body):
    r = await c.post(path, json=body)
    return r.status, await r.json()


async def test_estimate_endpoint_and_refusal_with_missing_mb_and_evictable(gpu_client):
    c = gpu_client
    status, est = await post(c, "/models/estimate", {"model": "tiny"})
    assert status == 200 and est["fit"]["fits"] is True
    assert est["estimate"]["overhead_mb"] == 1000 and 1000 < est["estimate"]["total_mb"] < 1100
    status, body = await post(c, "/models/load", {"model": "tiny"})
    assert status == 200 and body["gpu"] == 0 and body["estimate_mb"] == pytest.approx(est["estimate"]["total_mb"], abs=0.2)
    status, body = await post(c, "/models/load", {"model": "tiny-tools"})
    err = body["error"]
    assert status == 409 and err["code"] == "insufficient_vram", body
    assert err["missing_mb"] > 300 and err["evictable"] == ["tiny"] and "allow_eviction" in err["message"]
    assert c.orch.models["tiny-tools"].state.value == "unloaded" and c.orch.models["tiny"].state.value == "loaded"
    text = await (await c.get("/metrics")).text()
    assert metric_value(text, "model_orchestrator_admission_refusals_total", model="tiny-tools") == 1


async def test_allow_eviction_makes_room_and_says_what_it_evicted(gpu_client):
    c = gpu_client
    _, first = await post(c, "/models/load", {"model": "tiny"})
    status, body = await post(c, "/models/load", {"model": "tiny-tools", "allow_eviction": True})
    assert status == 200 and body["evicted"] == ["tiny"], body
    assert c.orch.models["tiny"].state.value == "unloaded" and c.orch.models["tiny-tools"].state.value == "loaded"
    text = await (await c.get("/metrics")).text()
    assert metric_value(text, "model_orchestrator_model_unloads_total", model="tiny", reason="evicted") == 1


async def test_lower_priority_goes_by_the_priority_rule_alone_but_never_a_busy_one(gpu_client):
    c = gpu_client
    await post(c, "/models/load", {"model": "tiny", "priority": 1})
    slot = c.orch.models["tiny"]
    with slot.request():  # a request in flight: never evicted under it; the load waits in the queue instead
        status, body = await post(c, "/models/load", {"model": "tiny-tools", "priority": 9, "wait": False})
        assert status == 202 and body["result"] == "queued", body
        await asyncio.sleep(0.5)
        assert slot.state.value == "loaded" and c.orch.models["tiny-tools"].state.value == "unloaded"
        st = await (await c.get("/models/status")).json()
        assert st["queues"]["tiny-tools"]["length"] == 1, st["queues"]
        status, body = await post(c, "/models/load", {"model": "tiny-tools", "priority": 9, "allow_eviction": True,
                                                      "force": True})  # force: it may end the request
        assert status == 200 and body["evicted"] == ["tiny"]
    await post(c, "/models/unload", {"model": "tiny-tools"})
    await post(c, "/models/load", {"model": "tiny", "priority": 1})
    status, body = await post(c, "/models/load", {"model": "tiny-tools", "priority": 9})  # idle and lower: goes
    assert status == 200 and body["evicted"] == ["tiny"]


async def test_two_loads_at_once_do_not_both_take_the_same_memory(gpu_client):
    c = gpu_client
    (s1, b1), (s2, b2) = await asyncio.gather(post(c, "/models/load", {"model": "tiny"}),
                                              post(c, "/models/load", {"model": "tiny-tools"}))
    assert sorted([s1, s2]) == [200, 409], (b1, b2)
    assert sum(s.state.value == "loaded" for s in c.orch.models.values()) == 1


async def test_reservations_count_evict_lower_priority_expire_and_release(gpu_client):
    c = gpu_client
    await post(c, "/models/load", {"model": "tiny"})  # priority 0
    status, r = await post(c, "/reservations", {"service": "whisperx", "vram_mb": 1200, "ttl_s": 60})
    assert status == 201 and r["service"] == "whisperx", r  # priority 50 > 0: tiny was evicted for it
    assert c.orch.models["tiny"].state.value == "unloaded"
    st = await (await c.get("/models/status")).json()
    assert st["reservations"][0]["id"] == r["id"] and st["gpus"][0]["reserved_mb"] == 1200
    assert st["gpus"][0]["available_mb"] == pytest.approx(1800 - 1200 - 200)
    status, body = await post(c, "/models/load", {"model": "tiny"})
    assert status == 409 and body["error"]["code"] == "insufficient_vram"  # the reservation counts
    text = await (await c.get("/metrics")).text()
    assert metric_value(text, "model_orchestrator_reservation_bytes", service="whisperx", gpu="0") == 1200 * 2**20
    status, renewed = await post(c, f"/reservations/{r['id']}/renew", {"ttl_s": 120})
    assert status == 200 and renewed["ttl_s"] == 120
    assert (await c.delete(f"/reservations/{r['id']}")).status == 200
    assert (await c.delete(f"/reservations/{r['id']}")).status == 404
    status, _ = await post(c, "/models/load", {"model": "tiny"})
    assert status == 200
    # a short-lived claim expires by itself
    await post(c, "/models/unload", {"model": "tiny"})
    status, r = await post(c, "/reservations", {"service": "ovi", "vram_mb": 1500, "ttl_s": 0.5})
    assert status == 201
    assert (await post(c, "/models/load", {"model": "tiny"}))[0] == 409
    await asyncio.sleep(0.7)
    assert (await post(c, "/models/load", {"model": "tiny"}))[0] == 200
    assert (await (await c.get("/reservations")).json())["reservations"] == []


async def test_the_guides_load_and_unload_of_another_services_model(gpu_client):
    c = gpu_client
    status, body = await post(c, "/models/load", {"model": "wan2.1-14b", "service": "comfyui", "vram_mb": 900})
    assert status == 200 and body["result"] == "reserved" and body["reservation"]["model"] == "wan2.1-14b"
    status, body = await post(c, "/models/load", {"model": "wan2.1-14b", "service": "comfyui"})
    assert status == 400 and "vram_mb" in body["error"]["message"]
    status, body = await post(c, "/models/unload", {"model": "wan2.1-14b"})
    assert status == 200 and body["result"] == "released" and body["released"][0]["service"] == "comfyui"
    status, body = await post(c, "/models/unload", {"model": "wan2.1-14b"})  # idempotent: nothing held any more
    assert status == 200 and body["result"] == "not_held", body


async def test_foreign_processes_count_against_admission(gpu_client):
    c = gpu_client
    from support.nvml import proc

    c.nv.procs[0].append(proc(4242, 700))  # e.g. WhisperX, started outside the orchestrator
    status, body = await post(c, "/models/load", {"model": "tiny"})
    assert status == 409 and body["error"]["missing_mb"] == pytest.approx(1000 + 700 + 200 - 1800, abs=80)
    st = await (await c.get("/models/status")).json()
    assert st["gpus"][0]["foreign_mb"] == 700


async def test_cap_on_loaded_models_in_cpu_mode(aiohttp_client, make_orchestrator):
    from model_orchestrator.server.api import create_app

    c = await aiohttp_client(create_app(make_orchestrator(max_loaded=1, swap_on_demand=False)))
    assert (await post(c, "/models/load", {"model": "tiny"}))[0] == 200
    status, body = await post(c, "/models/load", {"model": "tiny-tools"})
    assert status == 409 and body["error"]["evictable"] == ["tiny"] and body["error"]["code"] == "too_many_models"
    status, body = await post(c, "/models/load", {"model": "tiny-tools", "allow_eviction": True})
    assert status == 200 and body["evicted"] == ["tiny"]


async def test_two_loads_that_both_evict_the_same_model_do_not_both_fit_into_its_memory(gpu_client):
    """The eviction awaits an unload: without one admission decision at a time, the second load would count the
    memory being freed as its own too."""
    c = gpu_client
    await post(c, "/models/load", {"model": "tiny", "priority": 0})
    real_unload = c.orch._unload_model

    async def slow_unload(*args, **kwargs):  # a big model takes a while to stop and free its memory
        await asyncio.sleep(0.3)
        return await real_unload(*args, **kwargs)

    c.orch._unload_model = slow_unload
    (s1, b1), (s2, b2) = await asyncio.gather(post(c, "/models/load", {"model": "tiny-tools", "priority": 9}),
                                              post(c, "/models/load", {"model": "tiny-vision", "priority": 9}))
    assert sorted([s1, s2]) == [200, 409], (b1, b2)
    assert [s.id for s in c.orch.models.values() if s.state.value == "loaded"] in (["tiny-vision"], ["tiny-tools"])
