"""More than one machine on a real n8n: three sidecars on loopback in CPU mode stand in for three GPU nodes, each with
its own registry (every model known to two of them) and model cap. The n8n nodes (version 2) spread six models
over them by each sidecar's own verdict, answer every item on the node that holds its model, skip a node that does
not answer, and move a stopped node's items to another node.

Fleet in numbers: node-a knows m1-m4 (cap 3), node-b m3-m6 (cap 2), node-c m1, m2, m5, m6 (cap 3). Six models,
loaded one by one in the order m1..m6, go where the rules send them: loaded there already, else fits now (fewest
models loaded first, then the credential's order), else fits after evicting:
m1 -> a, m2 -> c, m3 -> b, m4 -> a, m5 -> b, m6 -> c (b is full by then)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from support.helpers import SidecarProcess, wait_until
from support.n8n import N8n, credential, n8n_with_nodes
from support.registry import model, write_registry

pytestmark = [
    pytest.mark.external,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(os.environ.get("MODEL_ORCHESTRATOR_SKIP_N8N") == "1", reason="MODEL_ORCHESTRATOR_SKIP_N8N=1"),
]

PKG = "n8n-nodes-model-orchestrator."
HELLO = "Hello from a tiny model!"
MODELS = [f"m{i}" for i in range(1, 7)]
NODES = {"node-a": (["m1", "m2", "m3", "m4"], 3), "node-b": (["m3", "m4", "m5", "m6"], 2),
         "node-c": (["m1", "m2", "m5", "m6"], 3)}
PLAN = {"node-a": {"m1", "m4"}, "node-b": {"m3", "m5"}, "node-c": {"m2", "m6"}}
LIST, ONE = "Fleet list", "Fleet one URL"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, model_dir, llama_server_bin):
    """node-a, node-b, node-c; node-a lists all three as its fleet (GET /fleet), as a headless Service would."""
    sidecars = {}
    for name, (ids, cap) in NODES.items():
        d = tmp_path_factory.mktemp(name)
        registry = write_registry(d / "models.toml", *(model(i, path=model_dir / "hello.gguf", context_size=512)
                                                       for i in ids))
        sidecars[name] = SidecarProcess(registry, d / "state", llama_server_bin,
                                        env={"MODEL_ORCHESTRATOR_NODE_NAME": name,
                                             "MODEL_ORCHESTRATOR_MAX_LOADED": str(cap)})
    sidecars["node-a"].env["MODEL_ORCHESTRATOR_FLEET"] = ",".join(f"127.0.0.1:{sp.port}" for sp in sidecars.values())
    for sp in sidecars.values():
        sp.start()
    yield sidecars
    for sp in sidecars.values():
        if sp.proc.poll() is None:
            sp.proc.send_signal(signal.SIGCONT)
        sp.stop()


def _node(name: str, type_: str, params: dict, x: int, credential: str | None = LIST, version: float = 2,
          **settings) -> dict:
    node = {"parameters": params, "id": f"fleet-{name}", "name": name, "type": type_, "typeVersion": version,
            "position": [x, 300], **settings}
    if credential:
        node["credentials"] = {"modelOrchestratorApi": {"id": None, "name": credential}}
    return node


def _chain(workflow_id: str, *nodes: dict) -> dict:
    start = _node("Start", "n8n-nodes-base.manualTrigger", {}, 0, credential=None, version=1)
    chain = [start, *nodes]
    return {"id": workflow_id, "name": workflow_id, "active": False, "settings": {"executionOrder": "v1"},
            "nodes": chain,
            "connections": {a["name"]: {"main": [[{"node": b["name"], "type": "main", "index": 0}]]}
                            for a, b in zip(chain, chain[1:])}}


ITEMS = _node("30 Items", "n8n-nodes-base.code", {"jsCode": (
    f"const models = {json.dumps(MODELS)};\n"
    "return Array.from({ length: 30 }, (_, i) => ({ json: { i, model: models[i % 6] } }));")}, 200,
    credential=None, version=2)
BY_ITEM = {"__rl": True, "mode": "id", "value": "={{ $json.model }}"}


def _chat(**settings) -> dict:
    return _node("Chat", PKG + "modelOrchestratorChat",
                 {"model": BY_ITEM, "messageMode": "simple", "userMessage": "Hi", "images": "none",
                  "options": {"maxTokens": 16, "timeoutS": 120}}, 600, **settings)


def _agent_workflow() -> dict:
    wf = _chain("tFleetAgent", _node("AI Agent", "@n8n/n8n-nodes-langchain.agent",
                                     {"promptType": "define", "text": "Say hello.", "options": {}}, 200,
                                     credential=None, version=3.1))
    wf["nodes"].append(_node("Fleet Chat Model", PKG + "lmChatModelOrchestrator",
                             {"model": {"__rl": True, "mode": "list", "value": "m5"},
                              "options": {"maxTokens": 16, "timeoutS": 120}}, 200, credential=ONE))
    wf["connections"]["Fleet Chat Model"] = {"ai_languageModel": [[{"node": "AI Agent", "type": "ai_languageModel",
                                                                   "index": 0}]]}
    return wf


@pytest.fixture(scope="module")
def n8n(fleet, tmp_path_factory) -> N8n:
    urls = [sp.url for sp in fleet.values()]
    status = lambda wid, cred: _chain(wid, _node("Status", PKG + "modelOrchestratorCheckVram", {"check": "none"}, 200,
                                                 credential=cred))
    return n8n_with_nodes(tmp_path_factory.mktemp("n8n-fleet"),
                          [credential(LIST, ", ".join(urls)), credential(ONE, fleet["node-a"].url)], [
        _chain("tFleet30", ITEMS, _node("Load Model", PKG + "modelOrchestratorLoadModel",
                                        {"model": BY_ITEM, "wait": True, "timeoutS": 120, "options": {}}, 400),
               _chat()),
        _chain("tFleetChat30", ITEMS, _chat(onError="continueRegularOutput")),
        status("tFleetStatusList", LIST), status("tFleetStatusOne", ONE),
        _agent_workflow(),
    ])


def _loaded(sp: SidecarProcess) -> set[str]:
    code, body = sp.call("GET", "/models/status")
    assert code == 200, body
    return {m for m, s in body["loaded_models"].items() if s["status"] == "loaded"}


def _chats_served(sp: SidecarProcess) -> float:
    code, text = _metrics(sp)
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("llamacpp_requests_total{")) if code == 200 else 0.0


def _metrics(sp: SidecarProcess) -> tuple[int, str]:
    import urllib.request
    try:
        with urllib.request.urlopen(sp.url + "/metrics", timeout=2) as r:
            return r.status, r.read().decode()
    except OSError:
        return 0, ""


def test_thirty_items_over_six_models_each_answered_by_the_node_that_holds_its_model(n8n, fleet):
    ex = n8n.execute("tFleet30", timeout=600)
    assert ex.rc == 0, ex.stderr[-3000:] + ex.stdout[-3000:]
    loads, chats = ex.outputs("Load Model")[0], ex.outputs("Chat")[0]
    assert len(loads) == len(chats) == 30
    held = {name: _loaded(sp) for name, sp in fleet.items()}
    assert held == PLAN, held  # each model on one node, where the rules send it; nothing loaded twice
    holder = {m: name for name, models in held.items() for m in models}
    for i, (load, chat) in enumerate(zip(loads, chats)):
        model = MODELS[i % 6]
        assert (load["model"], load["status"]) == (model, "loaded"), load
        assert load["node"] == chat["node"] == holder[model], (i, load, chat)
        assert chat["content"] == HELLO and chat["model"] == model, chat
        assert isinstance(chat["queue_wait_s"], (int, float)) and chat["queue_wait_s"] >= 0, chat  # X-Queue-Wait-Ms
    first = {load["model"]: load for load in loads[:6]}
    assert all(first[m]["result"] == "loaded" for m in MODELS), first  # the first item of each model took it
    assert all(load["result"] == "already_loaded" for load in loads[6:]), loads[6:]
    assert first["m6"]["placement"].startswith("m6 fits on node-c now"), first["m6"]  # node-b was full


def test_status_over_the_fleet_from_one_url_and_from_a_list(n8n, fleet):
    for workflow in ("tFleetStatusOne", "tFleetStatusList"):  # one URL: node-a's GET /fleet lists the others
        ex = n8n.execute(workflow)
        assert ex.rc == 0, ex.stderr[-3000:]
        st = ex.json("Status")
        assert sorted(n["node"] for n in st["nodes"]) == list(NODES) and st["skipped"] == [], st  # /fleet: by URL
        assert st["mode"] == "cpu" and st["free_mb"] is None
        assert {m: s["node"] for m, s in st["loaded_models"].items()} == \
            {m: name for name, models in PLAN.items() for m in models}


def test_the_chat_model_sub_node_goes_to_the_holder_and_says_so(n8n, fleet):
    before = {name: _chats_served(sp) for name, sp in fleet.items()}
    ex = n8n.execute("tFleetAgent")
    assert ex.rc == 0, ex.stderr[-3000:]
    assert ex.json("AI Agent")["output"] == HELLO
    after = {name: _chats_served(sp) for name, sp in fleet.items()}
    assert {n: after[n] - before[n] for n in NODES} == {"node-a": 0, "node-b": 1, "node-c": 0}  # m5 is on node-b
    run = ex.run_data["Fleet Chat Model"][0]["data"]["ai_languageModel"][0][0]["json"]
    info = run["response"]["generations"][0][0]["generationInfo"]
    assert info["node"] == "node-b" and isinstance(info["queue_wait_s"], (int, float)) and info["queue_wait_s"] >= 0, \
        run


def test_a_node_that_does_not_answer_is_skipped_with_a_message(n8n, fleet):
    c = fleet["node-c"]
    c.proc.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        t0 = time.monotonic()
        ex = n8n.execute("tFleetStatusList", timeout=120)
        took = time.monotonic() - t0
    finally:
        c.proc.send_signal(signal.SIGCONT)
    assert ex.rc == 0, ex.stderr[-3000:]
    st = ex.json("Status")
    assert [n["node"] for n in st["nodes"]] == ["node-a", "node-b"], st
    [skipped] = st["skipped"]
    assert skipped["url"] == c.url and "did not answer" in skipped["message"], skipped
    assert took < 60, took  # the probe's 5 s, not a hang


def test_a_node_stopped_mid_run_its_items_go_to_another_node(n8n, fleet):
    """30 chats over the six placed models; node-b is killed after it answered two: its models' later items go to
    the other node that knows each (m3 -> node-a, m5 -> node-c, both with room), or fail naming node-b; the run
    ends."""
    b = fleet["node-b"]
    assert _loaded(b) == PLAN["node-b"]
    start = _chats_served(b)
    killed = threading.Event()

    def kill_after_two():
        if wait_until(lambda: _chats_served(b) >= start + 2, 300, 0.02) is not None:
            b.kill9()
            killed.set()

    threading.Thread(target=kill_after_two, daemon=True).start()
    t0 = time.monotonic()
    ex = n8n.execute("tFleetChat30", timeout=600)
    took = time.monotonic() - t0
    assert killed.is_set(), "node-b never answered two chats"
    assert ex.rc == 0, ex.stderr[-3000:]
    chats = ex.outputs("Chat")[0]
    assert len(chats) == 30
    by_b = [i for i, c in enumerate(chats) if c.get("node") == "node-b"]
    assert len(by_b) >= 2, chats
    moved = [(i, c) for i, c in enumerate(chats) if i > max(by_b) and MODELS[i % 6] in PLAN["node-b"]]
    assert moved, "no item of node-b's models came after it stopped"
    for i, c in moved:
        if "error" in c:
            assert "node-b" in c["error"] or b.url in c["error"], c
        else:
            assert c["content"] == HELLO and c["node"] == {"m3": "node-a", "m5": "node-c"}[MODELS[i % 6]], (i, c)
    assert any("error" not in c for _, c in moved), moved
    for i, c in enumerate(chats):  # the other nodes' items never noticed
        if MODELS[i % 6] not in PLAN["node-b"]:
            assert c.get("content") == HELLO and c["node"] in ("node-a", "node-c"), (i, c)
    alive = {name: _loaded(sp) for name, sp in fleet.items() if name != "node-b"}
    assert alive == {"node-a": {"m1", "m4", "m3"}, "node-c": {"m2", "m6", "m5"}}, alive
    assert took < 300, took
