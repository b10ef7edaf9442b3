"""The GPU view. Without a GPU here, NVML's API is played by a stand-in for the unit tests; the same code reads a
real H100 in the tests marked `gpu`, which run on the device (results/ holds their logs)."""

import asyncio

import pytest

from model_orchestrator.platform.gpu import MIB, GpuView, NoGpuView, open_gpu_view
from support.helpers import metric_value
from support.nvml import FakeNvml, proc
from support.registry import model, registry


def test_snapshot_reads_every_field_and_tolerates_unsupported_readings():
    nv = FakeNvml({0: [proc(100, 17234), proc(200, 6000)], 1: [proc(300, 2**64 - 1)]})
    view = open_gpu_view(nv)
    assert isinstance(view, GpuView) and nv.inited and view.driver_version == "580.00"
    d0, d1 = view.snapshot().devices
    assert (d0.total_mb, d0.used_mb, d0.free_mb) == (32607, 23234, 32607 - 23234)
    assert (d0.utilization_percent, d0.temperature_c, d0.power_w, d0.power_limit_w) == (45.0, 61.0, 312.5, 575.0)
    assert d1.power_w is None  # NVMLError -> unknown, not zero
    assert [(p.pid, p.used_mb) for p in d0.processes] == [(100, 17234), (200, 6000)]
    assert d1.processes[0].used_mb is None  # NVML's "not available" sentinel


def test_snapshots_are_cached_briefly():
    nv = FakeNvml({0: [proc(1, 10)], 1: []})
    view = GpuView(nv, max_age_s=60)
    first = view.snapshot()
    nv.procs[0].append(proc(2, 10))
    assert view.snapshot() is first
    assert len(view.snapshot(fresh=True).devices[0].processes) == 2


def test_no_nvml_means_cpu_mode_with_the_reason():
    class Broken(FakeNvml):
        def nvmlInit(self):
            raise self.NVMLError("NVML Shared Library Not Found")

    view = open_gpu_view(Broken({}))
    assert isinstance(view, NoGpuView) and not view.available
    snap = view.snapshot()
    assert snap.devices == [] and "Shared Library Not Found" in snap.error


async def test_status_and_metrics_split_memory_between_models_and_foreign_processes(make_orchestrator, aiohttp_client):
    """/models/status and /metrics over the stand-in: the sidecar's own llama-server is attributed to its model,
    everything else is foreign."""
    from model_orchestrator.server.api import create_app

    nv = FakeNvml({0: [proc(999999, 6000)], 1: []})
    orch = make_orchestrator(gpu=GpuView(nv, max_age_s=0))
    client = await aiohttp_client(create_app(orch))
    r = await client.post("/models/load", json={"model": "tiny"})
    pid = (await r.json())["pid"]
    nv.procs[0].append(proc(pid, 17234))  # the driver now reports the model's llama-server
    await asyncio.sleep(2 * orch.settings.gpu_sample_s)  # answers are at most one sampling period old
    body = await (await client.get("/models/status")).json()
    assert body["mode"] == "gpu" and body["total_mb"] == 2 * 32607 and body["used_mb"] == 23234
    assert body["free_mb"] == 2 * 32607 - 23234 and body["utilization_percent"] == 45.0
    assert body["loaded_models"]["tiny"]["vram_mb"] == 17234
    g0 = body["gpus"][0]
    assert g0["foreign_mb"] == 6000
    assert {p["pid"]: p["model"] for p in g0["processes"]} == {pid: "tiny", 999999: None}
    text = await (await client.get("/metrics")).text()
    assert metric_value(text, "model_orchestrator_model_vram_bytes", gpu="0", model="tiny") == 17234 * MIB
    assert metric_value(text, "model_orchestrator_gpu_foreign_memory_bytes", gpu="0") == 6000 * MIB
    assert metric_value(text, "model_orchestrator_gpu_memory_total_bytes", gpu="1") == 32607 * MIB
    assert metric_value(text, "model_orchestrator_gpu_power_watts", gpu="0") == 312.5
    assert metric_value(text, "model_orchestrator_gpu_power_watts", gpu="1") is None  # unsupported: absent, not 0
    assert metric_value(text, "model_orchestrator_gpu_available") == 1


# ---- on a real GPU (the device) ---------------------------------------------------------------------------------
@pytest.mark.gpu
def test_real_nvml_reads_the_device():
    view = open_gpu_view()
    snap = view.snapshot(fresh=True)
    d = snap.devices[0]
    assert d.total_mb > 10_000 and 0 <= d.used_mb <= d.total_mb
    assert d.free_mb == pytest.approx(d.total_mb - d.used_mb, abs=2)
    assert d.utilization_percent is not None and d.temperature_c is not None and d.power_w is not None
    print(f"\nGPU {d.name}: total {d.total_mb} MiB, used {d.used_mb} MiB, {d.temperature_c} C, {d.power_w} W, "
          f"driver {snap.driver_version}")


@pytest.mark.gpu
async def test_real_gpu_load_shows_the_model_memory_and_unload_frees_it(tmp_path, model_dir, aiohttp_client):
    """A CUDA llama-server (LLAMA_SERVER_BIN) on the GPU: NVML sees its memory attributed to the model; unload frees
    it."""
    from model_orchestrator.server.api import create_app
    from model_orchestrator.files.install import find_llama_server
    from model_orchestrator.core.orchestrator import Orchestrator
    from model_orchestrator.platform.settings import Settings

    reg = registry(model("g", path=model_dir / "hello.gguf", context_size=32768, n_gpu_layers=99))
    gpu = open_gpu_view()
    orch = Orchestrator(Settings(state_dir=tmp_path / "s"), reg, gpu, find_llama_server())
    client = await aiohttp_client(create_app(orch))
    before = (await (await client.get("/models/status")).json())["used_mb"]
    r = await client.post("/models/load", json={"model": "g"})
    assert r.status == 200, await r.text()
    await asyncio.sleep(0.5)
    gpu._cached = None
    body = await (await client.get("/models/status")).json()
    vram = body["loaded_models"]["g"]["vram_mb"]
    print(f"\nused before {before} MiB, model's llama-server {vram} MiB, used after load {body['used_mb']} MiB")
    assert vram and vram > 100  # a CUDA context plus a 32K KV cache
    assert body["used_mb"] - before >= vram * 0.9
    text = await (await client.get("/metrics")).text()
    assert metric_value(text, "model_orchestrator_model_vram_bytes", gpu="0", model="g") == vram * MIB
    chat = await client.post("/v1/chat/completions",
                             json={"model": "g", "messages": [{"role": "user", "content": "hi"}]})
    assert (await chat.json())["choices"][0]["message"]["content"] == "Hello from a tiny model!"
    await client.post("/models/unload", json={"model": "g"})
    await asyncio.sleep(0.5)
    gpu._cached = None
    after = (await (await client.get("/models/status")).json())["used_mb"]
    print(f"used after unload {after} MiB")
    assert after <= before + 64  # freed (a little slack for other processes on a shared card)


@pytest.mark.gpu
async def test_real_gpu_admission_refuses_then_eviction_makes_room(tmp_path, aiohttp_client):
    """Real shapes on the real card: with the room cut to 20 GB by a reservation, the 30B-A3B MoE fits, an 8B then
    does not (refused with what is missing), and allowed to evict, the orchestrator frees the MoE's memory first."""
    from support.helpers import bench_module

    write_synthetic = bench_module("synthetic_gguf").write_synthetic

    from model_orchestrator.server.api import create_app
    from model_orchestrator.files.install import find_llama_server
    from model_orchestrator.core.orchestrator import Orchestrator
    from model_orchestrator.platform.settings import Settings

    moe = write_synthetic(tmp_path / "moe.gguf", "qwen3-30b-a3b")
    dense = write_synthetic(tmp_path / "dense.gguf", "llama-8b")
    reg = registry(model("moe", path=moe, context_size=8192, flash_attn="on"),
                   model("dense", path=dense, context_size=8192, flash_attn="on"))
    gpu = open_gpu_view()
    orch = Orchestrator(Settings(state_dir=tmp_path / "s", vram_margin_mb=512), reg, gpu, find_llama_server())
    c = await aiohttp_client(create_app(orch))
    st = await (await c.get("/models/status")).json()
    for g in st["gpus"]:  # 20 GB left on GPU 0, none on any other (a machine with two GPUs runs this too)
        squeeze = g["available_mb"] - (20000 if g["index"] == 0 else 0)
        r = await c.post("/reservations", json={"service": f"test-squeeze-{g['index']}", "vram_mb": squeeze,
                                                 "ttl_s": 600, "gpu": g["index"]})
        assert r.status == 201, await r.text()

    r = await c.post("/models/load", json={"model": "moe"})
    body = await r.json()
    assert r.status == 200, body
    await asyncio.sleep(0.5)
    gpu._cached = None
    st = await (await c.get("/models/status")).json()
    measured, estimate = st["loaded_models"]["moe"]["vram_mb"], st["loaded_models"]["moe"]["estimate_mb"]
    print(f"\nmoe: estimate {estimate} MiB, NVML {measured} MiB, available now {st['gpus'][0]['available_mb']} MiB")
    assert abs(estimate - measured) / measured < 0.05
    used_with_moe = st["used_mb"]

    r = await c.post("/models/load", json={"model": "dense", "allow_eviction": False})
    body = await r.json()
    print(f"dense refused: {body['error']['message']}")
    assert r.status == 409 and body["error"]["code"] == "insufficient_vram"
    assert body["error"]["missing_mb"] > 1000 and body["error"]["evictable"] == ["moe"]

    r = await c.post("/models/load", json={"model": "dense", "allow_eviction": True})
    body = await r.json()
    assert r.status == 200 and body["evicted"] == ["moe"], body
    await asyncio.sleep(0.5)
    gpu._cached = None
    st = await (await c.get("/models/status")).json()
    dense_mb = st["loaded_models"]["dense"]["vram_mb"]
    print(f"after eviction: used {used_with_moe} -> {st['used_mb']} MiB; dense NVML {dense_mb} MiB, "
          f"estimate {st['loaded_models']['dense']['estimate_mb']} MiB")
    assert "moe" not in st["loaded_models"] or st["loaded_models"]["moe"]["status"] == "unloaded"
    assert st["used_mb"] < used_with_moe - measured + dense_mb + 256  # the MoE's memory came back
    assert abs(st["loaded_models"]["dense"]["estimate_mb"] - dense_mb) / dense_mb < 0.05
    await c.post("/models/unload", json={"model": "dense"})
