"""Placement over several GPUs and the idle TTL, with real llama-servers (the GPUs are NVML's API played by the
stand-in of tests/support/nvml.py)."""

import asyncio

from model_orchestrator.platform.gpu import GpuView
from support.nvml import FakeNvml, proc
from support.registry import model, registry


def environ(pid: int) -> dict[str, str]:
    raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


async def test_a_model_goes_to_the_gpu_where_it_fits_and_sees_only_that_gpu(aiohttp_client, make_orchestrator):
    from model_orchestrator.server.api import create_app

    nv = FakeNvml({0: [proc(777, 1500)], 1: []}, total_mb=1800)  # GPU 0 is mostly taken by another service
    orch = make_orchestrator(gpu=GpuView(nv, max_age_s=0), cuda_overhead_mb=1000, vram_margin_mb=200)
    c = await aiohttp_client(create_app(orch))
    r = await c.post("/models/load", json={"model": "tiny"})
    body = await r.json()
    assert r.status == 200 and body["gpu"] == 1, body
    env = environ(body["pid"])
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    st = await (await c.get("/models/status")).json()
    assert st["loaded_models"]["tiny"]["gpu"] == 1 and st["gpus"][0]["foreign_mb"] == 1500
    r = await c.post("/models/load", json={"model": "tiny-tools", "allow_eviction": False})  # neither GPU has room
    assert r.status == 409 and (await r.json())["error"]["evictable"] == ["tiny"]


async def test_idle_ttl_unloads_an_unused_model(aiohttp_client, tmp_path, model_dir, llama_server_bin):
    from model_orchestrator.server.api import create_app
    from model_orchestrator.platform.gpu import NoGpuView
    from model_orchestrator.core.orchestrator import Orchestrator
    from model_orchestrator.platform.settings import Settings

    reg = registry(model("t", path=model_dir / "hello.gguf", context_size=512, idle_ttl_s=1.5))
    orch = Orchestrator(Settings(state_dir=tmp_path / "s"), reg, NoGpuView("test"), llama_server_bin)
    c = await aiohttp_client(create_app(orch))
    await c.post("/models/load", json={"model": "t"})
    slot = orch.models["t"]
    with slot.request():  # in flight: never unloaded for idleness
        await asyncio.sleep(3)
        assert slot.state.value == "loaded"
    for _ in range(60):
        if slot.state.value == "unloaded":
            break
        await asyncio.sleep(0.1)
    assert slot.state.value == "unloaded"
    text = await (await c.get("/metrics")).text()
    assert 'model_orchestrator_model_unloads_total{model="t",reason="idle"} 1.0' in text
