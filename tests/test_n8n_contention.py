"""Many executions, more models than fit, in a real n8n (2.40.7, `n8n start`): one workflow with three Chat nodes on
three models, started 4 times at once by its webhook, against a sidecar that may hold one model at a time
(MODEL_ORCHESTRATOR_MAX_LOADED=1). Every execution must end green: the sidecar's queue makes each request wait for
its model's turn instead of refusing it, and no n8n node needs a retry loop."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from support.helpers import ChildSampler, SidecarProcess
from support.n8n import CREDENTIAL_NAME, N8nServer, credential, n8n_with_nodes
from support.registry import fixture_models, write_registry

pytestmark = [
    pytest.mark.external,
    pytest.mark.timeout(1800),  # the first run installs n8n; n8n start takes a while on a busy host
    pytest.mark.skipif(os.environ.get("MODEL_ORCHESTRATOR_SKIP_N8N") == "1", reason="MODEL_ORCHESTRATOR_SKIP_N8N=1"),
]

PKG = "n8n-nodes-model-orchestrator."
MODELS = ("tiny", "tiny-tools", "tiny-generated")
EXECUTIONS = 4


def _three_models_workflow() -> dict:
    nodes = [{"parameters": {"httpMethod": "POST", "path": "three-models", "responseMode": "lastNode",
                             "options": {}},
              "id": "contention-start", "webhookId": "contention-start", "name": "Start",
              "type": "n8n-nodes-base.webhook", "typeVersion": 2, "position": [0, 300]}]
    connections, previous = {}, "Start"
    for i, model in enumerate(MODELS):
        name = f"Chat {model}"
        nodes.append({"parameters": {"model": model, "messageMode": "simple", "userMessage": f"Hello {i}",
                                     "options": {"maxTokens": 8}},
                      "id": f"contention-chat-{i}", "name": name, "type": PKG + "modelOrchestratorChat",
                      "typeVersion": 1, "position": [220 * (i + 1), 300],
                      "credentials": {"modelOrchestratorApi": {"id": None, "name": CREDENTIAL_NAME}}})
        connections[previous] = {"main": [[{"node": name, "type": "main", "index": 0}]]}
        previous = name
    names = json.dumps([f"Chat {m}" for m in MODELS])
    nodes.append({"parameters": {"jsCode": f"return [{{ json: {{ answers: {names}.map(n => $(n).first().json.content), "
                                           f"waited: {names}.map(n => $(n).first().json.queue_wait_s) }} }}];"},
                  "id": "contention-collect", "name": "Collect", "type": "n8n-nodes-base.code", "typeVersion": 2,
                  "position": [220 * (len(MODELS) + 1), 300]})
    connections[previous] = {"main": [[{"node": "Collect", "type": "main", "index": 0}]]}
    return {"id": "tThreeModels01", "name": "Three models, cap one", "active": False,
            "settings": {"executionOrder": "v1"}, "nodes": nodes, "connections": connections}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, model_dir, llama_server_bin):
    base = tmp_path_factory.mktemp("n8n-contention")
    sidecar = SidecarProcess(write_registry(base / "models.toml", *fixture_models(model_dir)), base / "state",
                             llama_server_bin, env={"MODEL_ORCHESTRATOR_MAX_LOADED": "1"}).start()
    server = None
    try:
        wf = _three_models_workflow()
        n8n = n8n_with_nodes(base, [credential(CREDENTIAL_NAME, sidecar.url)], [wf])
        n8n.publish(wf["id"])
        server = N8nServer(n8n).start(owner=False, logged="published workflows")
        yield {"sidecar": sidecar, "url": server.url, "log": server.log}
    finally:
        if server:
            server.stop()
        sidecar.stop()


def _execute(url: str) -> tuple[int, dict | str]:
    req = urllib.request.Request(f"{url}/webhook/three-models", method="POST", data=b"{}",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def test_four_parallel_executions_of_three_models_with_a_cap_of_one_all_green(setup):
    sidecar = setup["sidecar"]
    with ChildSampler(sidecar.proc.pid) as sampler, ThreadPoolExecutor(EXECUTIONS) as pool:
        t0 = time.monotonic()
        results = list(pool.map(lambda _: _execute(setup["url"]), range(EXECUTIONS)))
        took = time.monotonic() - t0
    waits = []
    for status, body in results:
        assert status == 200, (body, setup["log"].read_text()[-3000:])
        answers = body["answers"] if isinstance(body, dict) else None
        assert answers and all(a for a in answers), body
        assert answers[0] == "Hello from a tiny model!", answers
        waited = body["waited"]  # the Chat node says how long each request waited in the sidecar's queue
        assert all(isinstance(w, (int, float)) and w >= 0 for w in waited), waited
        waits.append(max(waited))
    assert max(waits) > 0, "with a cap of one, some execution must have waited for another model's turn"
    assert sampler.max_alive == 1, "two llama-servers were alive at once"
    with urllib.request.urlopen(sidecar.url + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    refused = [line for line in metrics.splitlines() if line.startswith("llamacpp_requests_total")
               and 'status="200"' not in line and not line.endswith(" 0.0")]
    assert not refused, refused  # no chat was refused on the way (no 409/503 that a retry hid)
    print(f"{EXECUTIONS} executions x {len(MODELS)} models in {took:.1f} s, {len(sampler.seen_pids)} loads")
