"""The events in a real n8n (2.40.7, `n8n start`): the Model Orchestrator Trigger starts a workflow on a sidecar event,
and the shipped slow-load workflow starts a load without waiting and resumes its Wait node when the sidecar's
callback arrives (the guide's callback pattern). A small HTTP receiver in the test sees what the workflows did."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from support.helpers import SidecarProcess, free_port, wait_until
from support.n8n import (CREDENTIAL_NAME, MODEL_EXPRESSION, N8nServer, adapt_workflow, credential, load_workflow,
                         n8n_with_nodes)
from support.registry import fixture_models, write_registry

PKG = "n8n-nodes-model-orchestrator."
TRIGGER = "When clicking 'Execute workflow'"
API_KEY = "events-key-5b0f"  # the sidecar needs it: the trigger's stream and the nodes send it as Bearer


def call(sp: SidecarProcess, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(sp.url + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
pytestmark = [
    pytest.mark.external,
    pytest.mark.timeout(1800),  # the first run installs n8n; n8n start takes a while on a busy host
    pytest.mark.skipif(os.environ.get("MODEL_ORCHESTRATOR_SKIP_N8N") == "1", reason="MODEL_ORCHESTRATOR_SKIP_N8N=1"),
]


class Receiver:
    """What the workflows POST to (their last HTTP Request node)."""

    def __init__(self):
        got = self.got = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                got.append((self.path, json.loads(body or b"{}")))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def posts(self, path: str) -> list[dict]:
        return [body for p, body in self.got if p == path]


def _report(name: str, url: str, y: int) -> dict:
    return {"parameters": {"method": "POST", "url": url, "sendBody": True, "specifyBody": "json",
                           "jsonBody": "={{ JSON.stringify($json) }}", "options": {}},
            "id": f"report-{name}-{y}", "name": name, "type": "n8n-nodes-base.httpRequest", "typeVersion": 4.2,
            "position": [1200, y]}


def _trigger_workflow(receiver: Receiver) -> dict:
    return {
        "id": "tTriggerEvents1", "name": "Trigger test", "active": False, "settings": {"executionOrder": "v1"},
        "nodes": [
            {"parameters": {"events": ["loaded", "evicted", "failed"], "models": ""}, "id": "trig-1",
             "name": "On Model Event", "type": PKG + "modelOrchestratorTrigger", "typeVersion": 1,
             "position": [0, 300], "credentials": {"modelOrchestratorApi": {"id": None, "name": CREDENTIAL_NAME}}},
            _report("Report Event", receiver.url + "/event", 300),
        ],
        "connections": {"On Model Event": {"main": [[{"node": "Report Event", "type": "main", "index": 0}]]}},
    }


def _callback_workflow(receiver: Receiver, model: str, workflow_id: str, path: str) -> dict:
    """The shipped workflow with the test's model, started by a webhook (its note: any trigger works) at its own
    path, and a report after each branch."""
    wf = adapt_workflow(load_workflow("slow-load-callback.json"), workflow_id=workflow_id, model=model)
    for node in wf["nodes"]:
        if node["name"] == TRIGGER:
            node.update({"parameters": {"httpMethod": "POST", "path": path, "options": {}},
                         "type": "n8n-nodes-base.webhook", "typeVersion": 2})
            node["webhookId"] = node["id"] = f"{workflow_id}-start"
        if node["name"] == "Wait for the Load":
            node["webhookId"] = node["id"] = f"{workflow_id}-wait"
    wf["nodes"] += [_report("Report Chat", receiver.url + f"/{workflow_id}/chat", 200),
                    _report("Report Failure", receiver.url + f"/{workflow_id}/failed", 420)]
    wf["connections"]["Chat"] = {"main": [[{"node": "Report Chat", "type": "main", "index": 0}]]}
    wf["connections"]["Load Failed"] = {"main": [[{"node": "Report Failure", "type": "main", "index": 0}]]}
    return wf


@pytest.fixture(scope="module")
def setup(tmp_path_factory, model_dir, llama_server_bin):
    base = tmp_path_factory.mktemp("n8n-events")
    receiver = Receiver()
    n8n_port = free_port()  # the sidecar may call n8n back there
    sidecar = SidecarProcess(write_registry(base / "models.toml", *fixture_models(model_dir)), base / "state",
                             llama_server_bin, env={"MODEL_ORCHESTRATOR_CALLBACK_HOSTS": f"127.0.0.1:{n8n_port}",
                                                    "MODEL_ORCHESTRATOR_API_KEY": API_KEY}).start()
    server = None
    try:
        workflows = [_trigger_workflow(receiver), _callback_workflow(receiver, "tiny", "tCallbackOk", "cb-ok"),
                     _callback_workflow(receiver, "broken", "tCallbackFail", "cb-fail")]
        n8n = n8n_with_nodes(base, [credential(CREDENTIAL_NAME, sidecar.url, API_KEY)], workflows)
        n8n.publish(*(wf["id"] for wf in workflows))  # active when n8n starts (the trigger connects, webhooks listen)
        server = N8nServer(n8n, port=n8n_port).start(owner=False)
        yield {"sidecar": sidecar, "receiver": receiver, "n8n_url": server.url, "log": server.log}
    finally:
        if server:
            server.stop()
        sidecar.stop()
        receiver.server.shutdown()


def _start(url: str, path: str) -> int:
    req = urllib.request.Request(f"{url}/webhook/{path}", method="POST", data=b"{}",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status


def test_trigger_node_starts_a_workflow_on_loaded_evicted_and_failed(setup):
    sidecar, receiver = setup["sidecar"], setup["receiver"]
    # the trigger connects when the workflow is activated at start-up; give it a moment to subscribe
    time.sleep(3)
    code, body = call(sidecar, "POST", "/models/load", {"model": "tiny-manual"})
    assert code == 200, body
    code, body = call(sidecar, "POST", "/models/load", {"model": "broken"})
    assert code == 503
    assert wait_until(lambda: {e.get("event") for e in receiver.posts("/event")} >= {"loaded", "load_failed"},
                      60, 0.2) is not None, (receiver.got, setup["log"].read_text()[-3000:])
    loaded = next(e for e in receiver.posts("/event") if e["event"] == "loaded")
    assert loaded["model"] == "tiny-manual" and loaded["load_seconds"] > 0
    failed = next(e for e in receiver.posts("/event") if e["event"] == "load_failed")
    assert failed["model"] == "broken" and failed["logs"]
    call(sidecar, "POST", "/models/unload", {"model": "tiny-manual"})


def test_slow_load_resumes_the_wait_node_when_the_callback_arrives(setup):
    sidecar, receiver = setup["sidecar"], setup["receiver"]
    call(sidecar, "POST", "/models/unload", {"model": "tiny"})
    assert _start(setup["n8n_url"], "cb-ok") == 200
    assert wait_until(lambda: receiver.posts("/tCallbackOk/chat"), 120, 0.2) is not None, \
        (receiver.got, setup["log"].read_text()[-3000:])
    chat = receiver.posts("/tCallbackOk/chat")[0]
    assert chat["content"]  # the chat ran after the load's callback resumed the workflow
    code, status = call(sidecar, "GET", "/models/status")
    assert status["loaded_models"]["tiny"]["status"] == "loaded"


def test_a_failed_slow_load_takes_the_failure_branch_with_the_reason(setup):
    receiver = setup["receiver"]
    assert _start(setup["n8n_url"], "cb-fail") == 200
    assert wait_until(lambda: receiver.posts("/tCallbackFail/failed"), 120, 0.2) is not None, \
        (receiver.got, setup["log"].read_text()[-3000:])
    failed = receiver.posts("/tCallbackFail/failed")[0]
    assert failed["model"] == "broken" and failed["result"] == "failed"
    assert failed["error"]["code"] in ("process_exited", "load_failed") and failed["error"]["logs"]
    assert not receiver.posts("/tCallbackFail/chat")


def test_shipped_callback_workflow_is_clean():
    """No pinData, the credential by name only, the load does not wait and calls this execution's resume URL."""
    wf = load_workflow("slow-load-callback.json")
    assert "pinData" not in wf
    nodes = {n["name"]: n for n in wf["nodes"]}
    for node in wf["nodes"]:
        assert node["type"].startswith((PKG, "n8n-nodes-base.")), node["type"]
        for ref in node.get("credentials", {}).values():
            assert ref == {"id": None, "name": CREDENTIAL_NAME}
    load = nodes["Start Loading"]["parameters"]
    assert load["wait"] is False and load["options"]["callbackUrl"] == "={{ $execution.resumeUrl }}"
    assert nodes["Wait for the Load"]["parameters"]["resume"] == "webhook"
    assert nodes["Start Loading"]["parameters"]["model"] == nodes["Chat"]["parameters"]["model"] == MODEL_EXPRESSION
    assert nodes[TRIGGER]["type"] == "n8n-nodes-base.manualTrigger"  # Execute in the editor runs it as shipped
