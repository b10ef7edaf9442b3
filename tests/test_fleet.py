"""More than one machine, the sidecar's part: each sidecar names its node (MODEL_ORCHESTRATOR_NODE_NAME) and lists
the fleet (GET /fleet from MODEL_ORCHESTRATOR_FLEET); `model-orchestrator status` shows several sidecars in one
table. The n8n nodes over a fleet: tests/test_n8n_fleet.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from model_orchestrator.server.api import create_app
from model_orchestrator.server.fleet import entries
from support.helpers import SidecarProcess, free_port


async def test_health_and_status_name_the_node(aiohttp_client, make_orchestrator):
    c = await aiohttp_client(create_app(make_orchestrator(node_name="gpu-box-7")))
    for path in ("/health", "/models/status", "/models"):
        r = await c.get(path)
        assert r.status == 200 and (await r.json())["node"] == "gpu-box-7", path


async def test_node_name_defaults_to_the_host_name(client):
    assert (await (await client.get("/health")).json())["node"] == socket.gethostname()


async def test_fleet_lists_every_address_of_every_entry(aiohttp_client, make_orchestrator):
    """A name with several addresses gives one member each (IPv4 when it has both families, as a sidecar bound to
    0.0.0.0 answers there); an entry without a port takes this sidecar's; a name that does not resolve is an
    error entry, not a failure of the route."""
    v4 = {i[4][0] for i in socket.getaddrinfo("localhost", 1, type=socket.SOCK_STREAM) if i[0] == socket.AF_INET}
    orch = make_orchestrator(node_name="a", port=8123, fleet="localhost:9001, 10.1.2.3,no-such-host.invalid:80")
    c = await aiohttp_client(create_app(orch))
    body = await (await c.get("/fleet")).json()
    assert body["node"] == "a" and body["fleet"] == orch.settings.fleet
    assert body["members"] == sorted([f"http://{a}:9001" for a in v4] + ["http://10.1.2.3:8123"]), body
    assert len(body["errors"]) == 1 and body["errors"][0].startswith("no-such-host.invalid: "), body


async def test_fleet_unset_is_this_sidecar_alone(client):
    assert await (await client.get("/fleet")).json() == {"node": socket.gethostname(), "fleet": None, "members": [],
                                                          "errors": []}


def test_fleet_entries_parse_hosts_ports_and_ipv6():
    assert entries("a.svc:9000, 10.0.0.5 [fd00::1]:9001,[::1],http://b/", 8000) == [
        ("a.svc", 9000), ("10.0.0.5", 8000), ("fd00::1", 9001), ("::1", 8000), ("b", 8000)]
    assert entries(None, 8000) == entries("", 8000) == []


# ---- `status` over several sidecars -----------------------------------------------------------------------------
@pytest.fixture
def two_sidecars(tmp_path, registry_file, llama_server_bin):
    """Two sidecars with their node names; the first lists both as its fleet."""
    a = SidecarProcess(registry_file, tmp_path / "a" / "state", llama_server_bin)
    b = SidecarProcess(registry_file, tmp_path / "b" / "state", llama_server_bin,
                       env={"MODEL_ORCHESTRATOR_NODE_NAME": "node-b"})
    a.env.update(MODEL_ORCHESTRATOR_NODE_NAME="node-a",
                 MODEL_ORCHESTRATOR_FLEET=f"127.0.0.1:{a.port},127.0.0.1:{b.port}")
    for sp in (a, b):
        (tmp_path / sp.env["MODEL_ORCHESTRATOR_NODE_NAME"][-1]).mkdir()
        sp.start()
    yield a, b
    for sp in (a, b):
        sp.stop()


def _status(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MODEL_ORCHESTRATOR_URL"}
    return subprocess.run([sys.executable, "-m", "model_orchestrator", "status", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def _rows(out: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("NODE"))
    return [line.split() for line in lines[start + 1:] if line and not line.startswith(("(", "http"))]


def test_status_of_several_urls_is_one_table_with_the_node(two_sidecars):
    a, b = two_sidecars
    code, body = b.call("POST", "/models/load", {"model": "tiny"})
    assert code == 200, body
    dead = f"http://127.0.0.1:{free_port()}"
    proc = _status("--url", f"{a.url},{b.url}", "--url", dead)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one sidecar did not answer
    rows = _rows(proc.stdout)
    assert {r[0] for r in rows} == {"node-a", "node-b"}
    assert ["node-b", "tiny", "*", "loaded"] == rows[[r[:2] for r in rows].index(["node-b", "tiny"])][:4]
    assert ["node-a", "tiny", "*", "unloaded"] == rows[[r[:2] for r in rows].index(["node-a", "tiny"])][:4]
    assert f"{dead}: did not answer: " in proc.stdout and "node-a: no GPU (CPU mode)" in proc.stdout
    # --json: every node's status and registry, the silent one with its error
    views = json.loads(_status("--json", "--url", f"{a.url},{b.url}").stdout)["nodes"]
    assert [v["status"]["node"] for v in views] == ["node-a", "node-b"]


def test_status_of_one_url_shows_the_fleet_its_sidecar_lists(two_sidecars):
    a, b = two_sidecars
    proc = _status("--url", a.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {r[0] for r in _rows(proc.stdout)} == {"node-a", "node-b"}
    # a sidecar without a fleet: today's one-node table, unchanged
    proc = _status("--url", b.url)
    assert proc.returncode == 0 and proc.stdout.startswith("GPU: none") and "NODE" not in proc.stdout, proc.stdout


def test_drain_unloads_every_model_without_force(two_sidecars):
    """Kubernetes' preStop: every loaded model unloaded, each after its requests in flight."""
    a, _ = two_sidecars
    for model in ("tiny", "tiny-tools"):
        code, body = a.call("POST", "/models/load", {"model": model})
        assert code == 200, body
    env = {k: v for k, v in os.environ.items() if k != "MODEL_ORCHESTRATOR_URL"}
    proc = subprocess.run([sys.executable, "-m", "model_orchestrator", "drain", "--url", a.url], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(proc.stdout.split("\n")[:2]) == ["tiny-tools: unloaded", "tiny: unloaded"], proc.stdout
    assert a.call("GET", "/models/status")[1]["loaded_models"] == {}
