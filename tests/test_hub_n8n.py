"""The n8n Check VRAM node's "enough for model" mode on a Hub model that is not downloaded: the sidecar estimates
it from the GGUF header read by range requests (tests/hf_mirror.py), and a real n8n takes the branch. Separate from
test_hub.py because it needs the n8n toolchain (MODEL_ORCHESTRATOR_SKIP_N8N=1 skips it)."""

from __future__ import annotations

import os

import pytest
from n8n_helpers import CREDENTIAL_NAME, N8n, build_package, install_package, install_toolchain
from test_hub import BIG_FILE, files, hub_sidecar, mirror  # noqa: F401 (fixtures)
from test_n8n import _branching_workflow

from model_orchestrator.estimate import estimate_file

pytestmark = [
    pytest.mark.timeout(1800),
    pytest.mark.skipif(os.environ.get("MODEL_ORCHESTRATOR_SKIP_N8N") == "1", reason="MODEL_ORCHESTRATOR_SKIP_N8N=1"),
]


def test_check_vram_enough_for_a_hub_model_not_downloaded(hub_sidecar, mirror, files, tmp_path):  # noqa: F811
    toolchain = install_toolchain()
    build_package(toolchain["NODE24"])
    user_folder = tmp_path / "n8n-user"
    user_folder.mkdir()
    install_package(toolchain["NODE24"], user_folder, tmp_path / "pack")
    n8n = N8n.create(toolchain["NODE24"], toolchain["N8N_BIN"], user_folder)
    n8n.import_credentials([{"id": "moCredHub0000001", "name": CREDENTIAL_NAME, "type": "modelOrchestratorApi",
                             "data": {"baseUrl": hub_sidecar.url, "apiKey": ""}}], tmp_path / "credentials.json")
    n8n.import_workflows([_branching_workflow("tVramHub", {"check": "model", "model": "big", "whenNoGpu": "enough"})],
                         tmp_path / "workflows")
    ex = n8n.execute("tVramHub")
    assert ex.rc == 0, ex.stderr[-3000:] + ex.stdout[-3000:]
    check = ex.json("Check VRAM")["vram_check"]
    local = estimate_file(files["big"], mmproj=files["mmproj"], n_ctx=131072, n_gpu_layers=99, cache_type="q8_0")
    assert check["model"] == "big" and abs(check["required_mb"] - local.total_mb) <= 1, check
    assert check["estimate"]["estimate"]["details"]["header_from"] == "hub"
    assert ex.ran("Enough") and not ex.ran("Not Enough")  # CPU mode counted as enough
    assert 0 < mirror.body_bytes() < files["big"].stat().st_size / 100
    assert not [r for r in mirror.file_gets() if BIG_FILE in r.path and not r.range], "only range reads"
