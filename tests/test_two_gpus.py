"""Two real GPUs (issue 12, item 6): placement on the GPU with room, a split model across both with the tensor split
the sidecar chose, NVML per-process memory per GPU in /models/status, eviction on the right GPU.

Real NVML, a CUDA llama-server (LLAMA_SERVER_BIN) and real-shape synthetic models (bench/synthetic_gguf.py); the
room on each GPU is set with reservations (what another service would hold). Skipped without two GPUs. With
TWO_GPU_RESULTS=path the observations are written there as JSON (results/ holds a run's).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from model_orchestrator.platform.gpu import open_gpu_view
from support.registry import model, registry

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]


def _two_gpus() -> bool:
    view = open_gpu_view()
    return view.available and len(view.snapshot().devices) >= 2


@pytest.fixture
async def two(tmp_path, aiohttp_client):
    if not _two_gpus():
        pytest.skip("needs two GPUs")
    sys.path.insert(0, str(ROOT / "bench"))
    from synthetic_gguf import write_synthetic

    from model_orchestrator.server.api import create_app
    from model_orchestrator.files.install import find_llama_server
    from model_orchestrator.core.orchestrator import Orchestrator
    from model_orchestrator.platform.settings import Settings

    dense = write_synthetic(tmp_path / "dense.gguf", "llama-8b")
    moe = write_synthetic(tmp_path / "moe.gguf", "qwen3-30b-a3b")
    common = {"context_size": 8192, "flash_attn": "on", "n_gpu_layers": 99}
    reg = registry(model("x", path=dense, priority=10, **common), model("y", path=dense, priority=60, **common),
                   model("z", path=dense, priority=50, **common), model("big", path=moe, split=True, **common))
    orch = Orchestrator(Settings(state_dir=tmp_path / "s", gpu_sample_s=0.1), reg, open_gpu_view(), find_llama_server())
    c = await aiohttp_client(create_app(orch))
    c.orch = orch
    c.record = {}
    yield c
    out = os.environ.get("TWO_GPU_RESULTS")
    if out:
        Path(out).write_text(json.dumps(c.record, indent=2))


async def _status(c) -> dict:
    await asyncio.sleep(0.3)  # two sampling periods: NVML has seen the newest process
    return await (await c.get("/models/status")).json()


async def _post(c, path, body):
    r = await c.post(path, json=body)
    return r.status, await r.json()


async def _squeeze(c, room_mb: dict[int, float]) -> list[str]:
    """Reserve memory on each GPU so that admission sees `room_mb[gpu]` available there."""
    st = await _status(c)
    ids = []
    for g in st["gpus"]:
        take = g["available_mb"] - room_mb[g["index"]]
        if take > 0:
            s, r = await _post(c, "/reservations",
                               {"service": f"squeeze{g['index']}", "vram_mb": take, "gpu": g["index"]})
            assert s == 201, r
            ids.append(r["id"])
    return ids


def _procs(st: dict, model: str) -> dict[int, int]:
    return {g["index"]: p["used_mb"] for g in st["gpus"] for p in g["processes"] if p["model"] == model}


async def test_two_gpus_placement_split_and_eviction(two):
    c = two
    s, est = await _post(c, "/models/estimate", {"model": "x"})
    dense_mb = est["estimate"]["total_mb"]
    s, est = await _post(c, "/models/estimate", {"model": "big"})
    moe_mb = est["estimate"]["total_mb"]
    c.record["estimate_mb"] = {"llama-8b": dense_mb, "qwen3-30b-a3b": moe_mb}

    # 1. placement: GPU 0 has room for nothing, GPU 1 for one dense model -> it goes to GPU 1
    held = await _squeeze(c, {0: 500, 1: dense_mb + 1500})
    s, body = await _post(c, "/models/load", {"model": "x"})
    assert s == 200 and body["gpu"] == 1, body
    st = await _status(c)
    procs = _procs(st, "x")
    c.record["placement"] = {"gpu": body["gpu"], "nvml_mb_by_gpu": procs, "estimate_mb": body["estimate_mb"]}
    assert list(procs) == [1] and procs[1] > 0.8 * dense_mb, procs
    assert st["loaded_models"]["x"]["vram_mb"] == procs[1]
    for rid in held:
        await c.delete(f"/reservations/{rid}")
    s, _ = await _post(c, "/models/unload", {"model": "x"})

    # 2. split: the MoE fits on neither GPU alone, on both together
    held = await _squeeze(c, {0: 0.65 * moe_mb, 1: 0.65 * moe_mb})
    s, body = await _post(c, "/models/load", {"model": "big"})
    assert s == 200, body
    slot = c.orch.models["big"]
    argv = Path(f"/proc/{slot.server.pid}/cmdline").read_bytes().decode().split("\0")
    shares = argv[argv.index("--tensor-split") + 1]
    st = await _status(c)
    procs = _procs(st, "big")
    c.record["split"] = {"decision_mb_by_gpu": slot.split, "tensor_split_arg": shares, "nvml_mb_by_gpu": procs,
                         "cuda_visible_devices": slot.server.plan.env.get("CUDA_VISIBLE_DEVICES")}
    assert sorted(procs) == [0, 1] and all(mb > 0.25 * moe_mb for mb in procs.values()), procs
    assert sorted(slot.split) == [0, 1]
    chat = await c.post("/v1/chat/completions", json={"model": "big", "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status == 200, await chat.text()
    for rid in held:
        await c.delete(f"/reservations/{rid}")
    await _post(c, "/models/unload", {"model": "big"})

    # 3. eviction on the right GPU: room for one dense model per GPU; x (priority 10) and y (60) take one each;
    #    z (50) may evict x only, so it must land on x's GPU and y must stay where it is
    held = await _squeeze(c, {0: dense_mb + 1500, 1: dense_mb + 1500})
    s, bx = await _post(c, "/models/load", {"model": "x"})
    s2, by = await _post(c, "/models/load", {"model": "y"})
    assert s == 200 and s2 == 200 and bx["gpu"] != by["gpu"], (bx, by)
    s, bz = await _post(c, "/models/load", {"model": "z"})
    assert s == 200 and bz["evicted"] == ["x"] and bz["gpu"] == bx["gpu"], bz
    st = await _status(c)
    c.record["eviction"] = {"x_gpu": bx["gpu"], "y_gpu": by["gpu"], "z_gpu": bz["gpu"], "evicted": bz["evicted"],
                            "nvml_mb_by_gpu": {m: _procs(st, m) for m in ("x", "y", "z")}}
    assert _procs(st, "x") == {} and list(_procs(st, "z")) == [bx["gpu"]] and list(_procs(st, "y")) == [by["gpu"]]
    for rid in held:
        await c.delete(f"/reservations/{rid}")
