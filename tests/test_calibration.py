"""The estimator checks and calibrates itself: after a load on a GPU the estimate is compared with NVML's
measurement of that llama-server (the stand-in NVML reports a chosen size for the real process), the error is
exported, and the learned per-process overhead of the card is persisted and used by the next estimate."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from support.helpers import metric_value
from model_orchestrator.core.calibration import EstimateCheck
from model_orchestrator.files.estimate import CALIBRATION, ESTIMATOR_VERSION
from model_orchestrator.platform.gpu import MIB, GpuView
from support.nvml import FakeNvml
from support.registry import model, registry


class MeasuringNvml(FakeNvml):
    """The stand-in NVML, reporting `measured_mb` for every llama-server the orchestrator runs (a real process)."""

    def __init__(self, measured_mb: float, name: str = "NVIDIA H100 80GB HBM3"):
        super().__init__({0: []}, total_mb=81559)
        self.measured_mb = measured_mb
        self.name = name
        self.orch = None

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        pids = self.orch.owned_pids() if self.orch else {}
        return [SimpleNamespace(pid=pid, usedGpuMemory=int(self.measured_mb * MIB)) for pid in pids]

    def nvmlDeviceGetMemoryInfo(self, h):
        used = sum(p.usedGpuMemory for p in self.nvmlDeviceGetComputeRunningProcesses(h))
        total = self.total_mb * MIB
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetName(self, h):
        return self.name


@pytest.fixture
def gpu_orchestrator(make_orchestrator):
    def make(measured_mb: float, **settings):
        nv = MeasuringNvml(measured_mb)
        orch = make_orchestrator(gpu=GpuView(nv, max_age_s=0), **settings)
        nv.orch = orch
        return orch

    return make


async def wait_check(orch, model: str, timeout: float = 10.0):
    for _ in range(int(timeout / 0.05)):
        if model in orch.admission.estimate_checks:
            return orch.admission.estimate_checks[model]
        await asyncio.sleep(0.05)
    raise AssertionError("no estimate check after the load")


async def test_first_load_on_a_card_teaches_its_overhead_to_the_next_estimate(gpu_orchestrator, aiohttp_client):
    from model_orchestrator.server.api import create_app

    orch = gpu_orchestrator(measured_mb=1500)
    c = await aiohttp_client(create_app(orch))
    r = await c.post("/models/load", json={"model": "tiny"})
    assert r.status == 200
    first = await wait_check(orch, "tiny")
    default_overhead = first.overhead_assumed_mb
    # estimate.py's default before any load on this card
    assert default_overhead == pytest.approx(CALIBRATION["cuda_overhead_mib"], abs=1)
    assert first.measured_mb == 1500 and first.error_mb == pytest.approx(1500 - first.estimate_mb)
    # exported: the metric and /models/status
    metrics = await (await c.get("/metrics")).text()
    assert metric_value(metrics, "model_orchestrator_estimate_error_bytes", model="tiny") == pytest.approx(
        first.error_mb * MIB, rel=1e-6)
    st = await (await c.get("/models/status")).json()
    assert st["loaded_models"]["tiny"]["estimate_check"]["error_mb"] == pytest.approx(first.error_mb, abs=0.1)
    # learned and persisted per card and driver
    saved = json.loads((orch.settings.state_dir / "calibration.json").read_text())["cards"]
    card = saved["NVIDIA H100 80GB HBM3|driver 580.00"]
    learned = 1500 - (first.estimate_mb - default_overhead)
    assert card["overhead_mb"] == pytest.approx(learned, abs=0.1)
    # the next load's estimate uses it: the same model is now estimated at what was measured
    assert (await c.post("/models/unload", json={"model": "tiny"})).status == 200
    assert (await c.post("/models/load", json={"model": "tiny"})).status == 200
    second = await wait_check(orch, "tiny")
    assert second.overhead_assumed_mb == pytest.approx(learned, abs=0.1)
    assert abs(second.error_mb) < 1
    assert (await c.post("/models/unload", json={"model": "tiny"})).status == 200


async def test_a_restarted_sidecar_uses_what_it_learned_and_the_setting_still_wins(gpu_orchestrator):
    orch = gpu_orchestrator(measured_mb=2000)
    orch.admission.calibration.record(EstimateCheck("tiny", "NVIDIA H100 80GB HBM3", 600, 2000, 573, 1900), "580.00")
    again = gpu_orchestrator(measured_mb=2000)  # a new process, same state dir
    est = await again.admission.estimate(again.models["tiny"].spec)
    assert est.overhead_mb == pytest.approx(1900)
    pinned = gpu_orchestrator(measured_mb=2000, cuda_overhead_mb=700)
    assert (await pinned.admission.estimate(pinned.models["tiny"].spec)).overhead_mb == pytest.approx(700)


async def test_an_overhead_learned_by_another_estimator_version_is_forgotten(gpu_orchestrator):
    """An overhead learned against another version's compute buffer carries that version's error: not reused."""
    orch = gpu_orchestrator(measured_mb=2000)
    orch.admission.calibration.record(EstimateCheck("tiny", "NVIDIA H100 80GB HBM3", 600, 2000, 573, 1900), "580.00")
    path = orch.settings.state_dir / "calibration.json"
    saved = json.loads(path.read_text())
    assert saved["cards"]["NVIDIA H100 80GB HBM3|driver 580.00"]["estimator"] == ESTIMATOR_VERSION
    restarted = gpu_orchestrator(measured_mb=2000)
    assert restarted.admission.calibration.overhead_mb("NVIDIA H100 80GB HBM3", "580.00") == 1900
    del saved["cards"]["NVIDIA H100 80GB HBM3|driver 580.00"]["estimator"]  # as version 1 wrote it
    path.write_text(json.dumps(saved))
    again = gpu_orchestrator(measured_mb=2000)
    assert again.admission.calibration.overhead_mb("NVIDIA H100 80GB HBM3", "580.00") is None
    assert (await again.admission.estimate(again.models["tiny"].spec)).overhead_mb == CALIBRATION["cuda_overhead_mib"]


async def test_another_card_or_driver_learns_separately_and_a_large_miss_is_logged(gpu_orchestrator, caplog):
    orch = gpu_orchestrator(measured_mb=2000)
    with caplog.at_level("WARNING"):
        orch.admission.calibration.record(EstimateCheck("big", "NVIDIA H100 80GB HBM3", 10000, 12000, 573, 2573),
                                          "580.00")
    assert "estimated 10000 MB, NVML measured 12000 MB" in caplog.text
    assert orch.admission.calibration.overhead_mb("NVIDIA H100 80GB HBM3", "575.00") is None
    assert orch.admission.calibration.overhead_mb("NVIDIA GeForce RTX 5090", "580.00") is None
    # the median of recent observations: one odd load does not swing it
    for observed in (600, 610, 5000):
        orch.admission.calibration.record(EstimateCheck("m", "NVIDIA L4", 1000, 1000, 500, observed), "580.00")
    assert orch.admission.calibration.overhead_mb("NVIDIA L4", "580.00") == 610


@pytest.mark.gpu
async def test_real_gpu_first_load_teaches_the_overhead_and_the_second_estimate_is_closer(tmp_path, aiohttp_client):
    """On the device: an 8B shape loads twice on a card this state dir has never seen; the first load's error is
    exported and the second load's estimate uses the learned overhead (printed for results/)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from synthetic_gguf import write_synthetic

    from model_orchestrator.server.api import create_app
    from model_orchestrator.platform.gpu import open_gpu_view
    from model_orchestrator.files.install import find_llama_server
    from model_orchestrator.core.orchestrator import Orchestrator
    from model_orchestrator.platform.settings import Settings

    dense = write_synthetic(tmp_path / "dense.gguf", "llama-8b")
    reg = registry(model("dense", path=dense, context_size=8192, flash_attn="on"))
    orch = Orchestrator(Settings(state_dir=tmp_path / "s"), reg, open_gpu_view(), find_llama_server())
    c = await aiohttp_client(create_app(orch))
    checks = []
    for _ in range(2):
        assert (await c.post("/models/load", json={"model": "dense"})).status == 200
        checks.append(await wait_check(orch, "dense", timeout=20))
        orch.admission.estimate_checks.pop("dense")
        assert (await c.post("/models/unload", json={"model": "dense"})).status == 200
    first, second = checks
    print(f"\n{first.gpu_name}: estimate {first.estimate_mb:.0f} MiB, NVML {first.measured_mb:.0f} MiB, error "
          f"{first.error_mb:+.0f} MiB (overhead assumed {first.overhead_assumed_mb:.0f}, observed "
          f"{first.overhead_observed_mb:.0f}); second load: assumed {second.overhead_assumed_mb:.0f}, error "
          f"{second.error_mb:+.0f} MiB")
    assert second.overhead_assumed_mb == pytest.approx(first.overhead_observed_mb, abs=0.2)
    assert abs(second.error_mb) <= abs(first.error_mb) + 16
    assert (orch.settings.state_dir / "calibration.json").exists()
