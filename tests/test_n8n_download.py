"""The n8n Load Model node and download on first load (issue 11), in a real n8n 2.40.7: a Load Model node for a Hub
model never downloaded runs green, its output saying what the download took (`download`: bytes_total, seconds, ...).
The node does not hold one request open for the whole download (it POSTs the load with wait=false and polls
GET /models/status), so a download longer than the node's Timeout plus its margin does not fail it; an unload during
the download fails it with "the load was cancelled". Against a real sidecar, a real llama-server and a local server
speaking the Hub's file protocol (tests/support/hf_mirror.py), slowed down so that the download takes a while."""

from __future__ import annotations

import os
import threading
import time

import pytest

from support.helpers import SidecarProcess, wait_for
from support.hf_mirror import HfMirror
from support.n8n import CREDENTIAL_NAME, PKG_NAME, credential, n8n_with_nodes
from support.registry import model, write_registry
from support.tiny_models import write_tiny_model

REPO = "test-org/Tiny-GGUF"
FILE = "tiny-Q8_0.gguf"
SLOW_FILE = "tiny-tools-Q8_0.gguf"  # another tiny model (other bytes: the Hub cache shares equal blobs)
TIMEOUT_S = 10  # the node's Timeout: llama-server's start only
LONG_DOWNLOAD_S = 45.0  # longer than Timeout + the node's 30 s margin (the HTTP limit of a wait=true POST before)

pytestmark = [
    pytest.mark.external,
    pytest.mark.skipif(os.environ.get("MODEL_ORCHESTRATOR_SKIP_N8N") == "1", reason="MODEL_ORCHESTRATOR_SKIP_N8N=1"),
]


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory) -> bytes:
    return write_tiny_model(tmp_path_factory.mktemp("dl") / FILE).read_bytes()


@pytest.fixture(scope="module")
def slow_bytes(tmp_path_factory) -> bytes:
    return write_tiny_model(tmp_path_factory.mktemp("dl") / SLOW_FILE, behaviour="tool_call").read_bytes()


@pytest.fixture(scope="module")
def mirror(tiny_bytes, slow_bytes):
    m = HfMirror({REPO: {FILE: tiny_bytes, SLOW_FILE: slow_bytes}}).start()
    yield m
    m.stop()


@pytest.fixture(scope="module")
def hub_sidecar(tmp_path_factory, mirror, llama_server_bin):
    tmp = tmp_path_factory.mktemp("sidecar")
    registry = write_registry(tmp / "models.toml", model("tiny", hf=REPO, file=FILE, context_size=512),
                              model("tiny-slow", hf=REPO, file=SLOW_FILE, context_size=512))
    sp = SidecarProcess(registry, tmp / "state", llama_server_bin, env=mirror.client_env(tmp / "hf-home")).start()
    yield sp
    sp.stop()


@pytest.fixture(scope="module")
def n8n(tmp_path_factory, hub_sidecar):
    return n8n_with_nodes(tmp_path_factory.mktemp("n8n"), [credential(CREDENTIAL_NAME, hub_sidecar.url)],
                          [load_workflow("tLoadDownload", "tiny"), load_workflow("tLoadCancelled", "tiny-slow")])


def load_workflow(workflow_id: str, model: str) -> dict:
    """Manual trigger -> Load Model (Wait Until Ready, Timeout TIMEOUT_S)."""
    return {
        "id": workflow_id, "name": workflow_id, "active": False, "settings": {"executionOrder": "v1"},
        "nodes": [
            {"parameters": {}, "id": f"{workflow_id}-t", "name": "Start", "type": "n8n-nodes-base.manualTrigger",
             "typeVersion": 1, "position": [0, 300]},
            {"parameters": {"model": model, "wait": True, "timeoutS": TIMEOUT_S, "options": {}},
             "id": f"{workflow_id}-l", "name": "Load Model", "type": PKG_NAME + ".modelOrchestratorLoadModel",
             "typeVersion": 1, "position": [220, 300],
             "credentials": {"modelOrchestratorApi": {"id": None, "name": CREDENTIAL_NAME}}},
        ],
        "connections": {"Start": {"main": [[{"node": "Load Model", "type": "main", "index": 0}]]}},
    }


@pytest.mark.timeout(1800)
def test_load_model_downloads_a_hub_model_never_downloaded_and_says_what_it_took(n8n, hub_sidecar, mirror,
                                                                                  tiny_bytes):
    mirror.rate[FILE] = len(tiny_bytes) / LONG_DOWNLOAD_S
    assert hub_sidecar.call("GET", "/models/status")[1]["loaded_models"] == {}
    t0 = time.monotonic()
    ex = n8n.execute("tLoadDownload", timeout=600)
    took = time.monotonic() - t0
    assert ex.rc == 0, ex.stderr[-3000:] + ex.stdout[-3000:]
    out = ex.json("Load Model")
    assert out["model"] == "tiny" and out["status"] == "loaded" and out["result"] == "loaded", out
    assert out["pid"] and out["port"] is None and out["load_seconds"] is not None and out["evicted"] == [], out
    d = out["download"]
    assert d["bytes_total"] == len(tiny_bytes), d
    assert d["files"] == [{"file": FILE, "bytes_total": len(tiny_bytes), "resumed_from": 0}] and d["resumed_from"] == 0
    assert d["bytes_per_second"] > 0 and d["seconds"] > TIMEOUT_S, d
    # longer than Timeout + the 30 s margin, which was the HTTP limit of the one long request the node used to make
    assert took > TIMEOUT_S + 30, took
    status = hub_sidecar.call("GET", "/models/status")[1]["loaded_models"]["tiny"]
    assert status["status"] == "loaded" and status["pid"] == out["pid"], status
    gets = [r for r in mirror.file_gets() if r.path.endswith(FILE)]
    assert len(gets) == 1 and gets[0].body_bytes == len(tiny_bytes), gets  # downloaded once
    # a second run: already loaded, no download
    again = n8n.execute("tLoadDownload")
    assert again.rc == 0, again.stderr[-3000:]
    out = again.json("Load Model")
    assert out["result"] == "already_loaded" and "download" not in out and out["pid"] == status["pid"], out


@pytest.mark.timeout(900)
def test_an_unload_during_the_download_fails_the_node_as_cancelled(n8n, hub_sidecar, mirror, slow_bytes):
    mirror.rate[SLOW_FILE] = len(slow_bytes) / 120  # would take 2 minutes
    runs: dict = {}
    thread = threading.Thread(target=lambda: runs.__setitem__("ex", n8n.execute("tLoadCancelled", timeout=600)))
    thread.start()

    def downloading():
        m = hub_sidecar.call("GET", "/models/status")[1]["loaded_models"].get("tiny-slow")
        return m if m and m["status"] == "downloading" and m["download"]["bytes_done"] > 0 else None

    wait_for(downloading, timeout=180, what="tiny-slow downloading (started by the n8n node)")
    status, body = hub_sidecar.call("POST", "/models/unload", {"model": "tiny-slow"})
    assert status == 200 and body["result"] == "cancelled_download", body
    thread.join(300)
    ex = runs["ex"]
    assert ex.rc != 0, ex.stdout[-3000:]
    assert "the load of tiny-slow was cancelled (an unload stopped it)" in (ex.stdout + ex.stderr).lower(), \
        ex.stdout[-3000:] + ex.stderr[-3000:]
    assert "tiny-slow" not in hub_sidecar.call("GET", "/models/status")[1]["loaded_models"]
