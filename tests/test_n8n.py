"""The n8n community nodes (n8n-nodes/) and the shipped workflows (workflows/), run by a real n8n.

- unit: the package's own tests (Node's built-in runner: request building, binary -> data URL, tools, errors),
  `n8n-node lint`, and what `npm pack` would publish;
- end to end: n8n 2.40.7 installed from npm (cached in ~/.cache/model-orchestrator/n8n by
  n8n-nodes/scripts/install-n8n.sh), the packed package under $N8N_USER_FOLDER/.n8n/nodes/node_modules, credentials
  and workflows imported headless, `n8n execute --id ... --rawOutput` against a real sidecar serving tiny generated
  models (CPU mode: free_mb is null).

The first run installs n8n (~5 minutes, ~3 GB); later runs reuse the cache. MODEL_ORCHESTRATOR_SKIP_N8N=1 skips
this module."""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request

import pytest

from support.helpers import SidecarProcess
from support.n8n import (CREDENTIAL_NAME, MODEL_EXPRESSION, PKG_DIR, N8n, adapt_workflow, branching_workflow,
                         build_package, credential, install_package, install_toolchain, load_workflow, model_name,
                         n8n_with_nodes, run_node_tool, workflow_model)
from support.registry import fixture_models, write_registry

pytestmark = [
    pytest.mark.external,
    pytest.mark.timeout(1800),  # the first run installs n8n
    pytest.mark.skipif(os.environ.get("MODEL_ORCHESTRATOR_SKIP_N8N") == "1", reason="MODEL_ORCHESTRATOR_SKIP_N8N=1"),
]

HELLO = "Hello from a tiny model!"
API_KEY = "n8n-test-key-0123456789"
PKG = "n8n-nodes-model-orchestrator."
SHIPPED = ["llama-chat-example.json", "agent-local-model.json", "describe-image.json"]


# ---------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def toolchain() -> dict[str, str]:
    paths = install_toolchain()
    build_package(paths["NODE24"])
    return paths


def _sidecar(tmp_path_factory, model_dir, llama_server_bin, name: str, env: dict | None = None) -> SidecarProcess:
    d = tmp_path_factory.mktemp(name)
    registry = write_registry(d / "models.toml", *fixture_models(model_dir))
    return SidecarProcess(registry, d / "state", llama_server_bin, env=env).start()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory, model_dir, llama_server_bin):
    sp = _sidecar(tmp_path_factory, model_dir, llama_server_bin, "n8n-sidecar")
    yield sp
    sp.stop()


@pytest.fixture(scope="module")
def capped_sidecar(tmp_path_factory, model_dir, llama_server_bin):
    """At most one model loaded: a second model does not fit until the first is unloaded (the Not Enough branch)."""
    sp = _sidecar(tmp_path_factory, model_dir, llama_server_bin, "n8n-capped-sidecar",
                  env={"MODEL_ORCHESTRATOR_MAX_LOADED": "1"})
    yield sp
    sp.stop()


@pytest.fixture(scope="module")
def keyed_sidecar(tmp_path_factory, model_dir, llama_server_bin):
    sp = _sidecar(tmp_path_factory, model_dir, llama_server_bin, "n8n-keyed-sidecar",
                  env={"MODEL_ORCHESTRATOR_API_KEY": API_KEY})
    yield sp
    sp.stop()


def _unload_workflow(workflow_id: str, model) -> dict:
    """Manual trigger -> Unload Model with the given model parameter value."""
    return {
        "id": workflow_id, "name": workflow_id, "active": False, "settings": {"executionOrder": "v1"},
        "nodes": [
            {"parameters": {}, "id": f"{workflow_id}-t", "name": "Start", "type": "n8n-nodes-base.manualTrigger",
             "typeVersion": 1, "position": [0, 300]},
            {"parameters": {"model": model, "force": False, "drainTimeoutS": 5}, "id": f"{workflow_id}-u",
             "name": "Unload", "type": PKG + "modelOrchestratorUnloadModel", "typeVersion": 1, "position": [220, 300],
             "credentials": {"modelOrchestratorApi": {"id": None, "name": CREDENTIAL_NAME}}},
        ],
        "connections": {"Start": {"main": [[{"node": "Unload", "type": "main", "index": 0}]]}},
    }


def _test_workflows() -> list[dict]:
    chat, agent, image = (load_workflow(n) for n in SHIPPED)
    keyed = {"id": None, "name": "Model Orchestrator keyed"}
    wrong = {"id": None, "name": "Model Orchestrator wrong key"}
    capped = {"id": None, "name": "Model Orchestrator capped"}
    return [  # the shipped workflows with one change, the Model node's value, as a user would make it
        adapt_workflow(chat, workflow_id="tChatEnough", model="tiny"),
        adapt_workflow(chat, workflow_id="tChatNotEnough", model="tiny", credential=capped),
        adapt_workflow(chat, workflow_id="tChatUnknown", model="no-such-model"),
        adapt_workflow(chat, workflow_id="tChatKeyed", model="tiny", credential=keyed),
        adapt_workflow(chat, workflow_id="tChatWrongKey", model="tiny", credential=wrong),
        adapt_workflow(agent, workflow_id="tAgent", model="tiny"),
        adapt_workflow(agent, workflow_id="tAgentKeyed", model="tiny-generated", credential=keyed),
        adapt_workflow(image, workflow_id="tImage", model="tiny-vision"),
        adapt_workflow(image, workflow_id="tImageNoVision", model="tiny"),
        adapt_workflow(chat, workflow_id="tToolsContinue", model="tiny-tools",
                       params={"Chat": {"tools": json.dumps([WEATHER_TOOL]), "userMessage": "Weather in Paris?"}}),
        _unload_workflow("tUnloadByName", {"__rl": True, "mode": "id", "value": "wan2.1-14b"}),
        _unload_workflow("tUnloadLegacy", "tiny"),  # saved before the parameter was a resource locator
        branching_workflow("tVramZero", {"check": "requiredMb", "requiredMb": 0, "whenNoGpu": "notEnough"}),
        branching_workflow("tVramModel", {"check": "model", "model": "tiny", "whenNoGpu": "enough"}),
        branching_workflow("tVramLoaded", {"check": "model", "model": "tiny-alias"}),
    ]


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def n8n(toolchain, sidecar, keyed_sidecar, capped_sidecar, tmp_path_factory) -> N8n:
    credentials = [credential(CREDENTIAL_NAME, sidecar.url),
                   credential("Model Orchestrator keyed", keyed_sidecar.url + "/v1/", API_KEY),
                   credential("Model Orchestrator wrong key", keyed_sidecar.url, "not-the-key"),
                   credential("Model Orchestrator capped", capped_sidecar.url)]
    # the shipped workflows as they are, credential by name: only their model ids differ in the tests' variants
    return n8n_with_nodes(tmp_path_factory.mktemp("n8n"), credentials,
                          [load_workflow(n) for n in SHIPPED] + _test_workflows())


def _status(sp: SidecarProcess, headers_key: str | None = None) -> dict:
    code, body = sp.call("GET", "/models/status")
    assert code == 200, body
    return body


def _loaded(sp: SidecarProcess) -> set[str]:
    return {m for m, s in _status(sp)["loaded_models"].items() if s["status"] == "loaded"}


# ---------------------------------------------------------------------------------------------------- unit

def test_package_unit_tests_pass(toolchain):
    """n8n-nodes/test/*.test.mjs: request building, binary -> data URL, tools, errors, nodes with a fake context."""
    proc = subprocess.run([toolchain["NODE24"], "--test", "--test-reporter=tap", "test/*.test.mjs"], cwd=PKG_DIR,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    passed = int(re.search(r"^# pass (\d+)", proc.stdout, re.M).group(1))
    assert passed >= 20 and re.search(r"^# fail 0$", proc.stdout, re.M), proc.stdout[-3000:]


def test_lint_is_clean(toolchain):
    proc = run_node_tool(toolchain["NODE24"], "n8n-node", "lint")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert not re.search(r"\d+ problems?", proc.stdout + proc.stderr), proc.stdout[-6000:]


def test_package_meets_the_verification_guidelines(toolchain, tmp_path):
    pkg = json.loads((PKG_DIR / "package.json").read_text())
    assert pkg["name"] == "n8n-nodes-model-orchestrator"
    assert pkg["license"] == "MIT"
    assert "n8n-community-node-package" in pkg["keywords"]
    assert not pkg.get("dependencies"), "no runtime dependencies"
    target = install_package(toolchain["NODE24"], tmp_path / "user", tmp_path / "pack")
    for path in pkg["n8n"]["nodes"] + pkg["n8n"]["credentials"]:
        assert (target / path).is_file(), path
    assert not (target / "test").exists() and not (target / "nodes").exists(), "only dist/ is published"
    js = "\n".join(p.read_text() for p in (target / "dist").rglob("*.js"))
    for forbidden in ("child_process", "require(\"fs\")", "require('fs')", "node:fs", "process.env"):
        assert forbidden not in js, forbidden
    icons = list((target / "dist" / "icons").glob("*.svg"))
    # light + dark for each of the six nodes and the credential (tests/test_n8n_install.py checks which is whose)
    assert len(icons) == 2 * 7 and all(i.read_text().lstrip().startswith("<svg") for i in icons)


def test_shipped_workflows_are_clean():
    """No pinData, the credential referenced by name only, only this package's and n8n's own node types."""
    for name in SHIPPED:
        wf = load_workflow(name)
        assert "pinData" not in wf, name
        for node in wf["nodes"]:
            assert node["type"].startswith((PKG, "n8n-nodes-base.", "@n8n/n8n-nodes-langchain.")), node["type"]
            for ref in node.get("credentials", {}).values():
                # "id": null makes n8n's import look the credential up by name (a missing id would take any of the type)
                assert ref == {"id": None, "name": CREDENTIAL_NAME}, (name, node["name"], ref)
    # one place names the model, the default of the registry `make run` serves; every node reads it from there
    from model_orchestrator.files.registry import load_registry

    for name in SHIPPED + ["slow-load-callback.json"]:
        wf = load_workflow(name)
        assert workflow_model(wf) == load_registry().default_model == "smollm2-135m", name
        for node in wf["nodes"]:
            if "model" in node["parameters"] and node["name"] != "Unload Idle Model":
                assert model_name(node["parameters"]["model"]) == MODEL_EXPRESSION, (name, node["name"])
            assert "qwen3" not in node["name"].lower(), (name, node["name"])  # no node name says another model
    chat = load_workflow("llama-chat-example.json")
    models = {n["name"]: model_name(n["parameters"].get("model")) for n in chat["nodes"]}
    # no guessed model names: the Not Enough branch unloads what the sidecar's verdict names
    assert models["Unload Idle Model"] == "={{ $json.model }}"
    check = next(n for n in chat["nodes"] if n["name"] == "Check VRAM")["parameters"]
    assert check["check"] == "model"
    for node in chat["nodes"]:  # the Unload nodes take any name (resource locator): no "not supported" warning
        if node["type"] == PKG + "modelOrchestratorUnloadModel":
            assert node["parameters"]["model"]["__rl"] is True, node["name"]


# ---------------------------------------------------------------------------------------------------- end to end

def test_shipped_llama_chat_example_fails_cleanly_without_its_model(n8n, sidecar):
    """The shipped workflow, imported as is: its model smollm2-135m is not in the test registry, so Check VRAM's
    question to the sidecar fails with the sidecar's message, and nothing is loaded. (With the registry `make run`
    serves it runs green: tests/test_first_hour.py.)"""
    ex = n8n.execute("moLlamaChatEx001")
    assert ex.rc != 0 and not ex.ran("Load Model")
    error = json.dumps(ex.error or ex.run_data["Check VRAM"][0].get("error"))
    assert "unknown model 'smollm2-135m'" in error, error


def _expected_prompt(ex) -> str:
    """The example's Chat prompt as its expressions must resolve from the earlier nodes' outputs."""
    status, load = ex.json("GPU Status"), ex.json("Load Model")
    assert status["mode"] == "cpu"
    loaded = ", ".join(f"{m} ({s['status']}{', ' + str(s['vram_mb']) + ' MB' if s.get('vram_mb') else ''})"
                       for m, s in status["loaded_models"].items()) or "none"
    took = f" in {load['load_seconds']:.1f} s" if load.get("load_seconds") else ""
    unloaded = (", ".join(f"{j['model']} ({j['result']})" for j in ex.outputs("Unload Idle Model")[0])
                if ex.ran("Unload Idle Model") else "nothing")
    return ("You watch a GPU server that runs local language models for n8n. Its state right now:\n"
            "- GPU memory: no GPU (CPU mode, no memory figures)\n"
            f"- loaded models: {loaded}\n"
            f"- {load['model']}: {load['result']}{took}\n"
            f"- unloaded first to make room: {unloaded}\n"
            "In two sentences, tell the operator how much room is left for another model.")


def _assert_prompt_used(ex, sp: SidecarProcess, expected: str) -> None:
    """The Chat node sent exactly the expected prompt: the same messages cost the same prompt tokens. (This loads
    tiny on demand and unloads it again.)"""
    params = next(n for n in load_workflow("llama-chat-example.json")["nodes"] if n["name"] == "Chat")["parameters"]
    try:
        code, direct = sp.call("POST", "/v1/chat/completions", {
            "model": "tiny", "max_tokens": 1,
            "messages": [{"role": "system", "content": params["systemPrompt"]}, {"role": "user", "content": expected}]})
    finally:
        sp.call("POST", "/models/unload", {"model": "tiny", "force": True})
    assert code == 200, direct
    assert ex.json("Chat")["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"], expected


def test_llama_chat_example_enough_branch(n8n, sidecar):
    """Fresh stack, nothing loaded: the sidecar says the model fits, so no unload; load, status, chat, unload."""
    assert _loaded(sidecar) == set()
    ex = n8n.execute("tChatEnough")
    assert ex.rc == 0, ex.stderr[-3000:]
    enough, not_enough = ex.outputs("Check VRAM")
    assert len(enough) == 1 and not_enough == []
    check = enough[0]["vram_check"]
    assert (check["enough"], check["gpu"], check["model"]) == (True, False, "tiny")
    assert check["fit"]["fits_after_eviction"] is True and check["fit"]["evict"] == [] and check["required_mb"] > 0
    assert not ex.ran("Models To Unload") and not ex.ran("Unload Idle Model")
    load = ex.json("Load Model")
    assert (load["model"], load["status"], load["result"]) == ("tiny", "loaded", "loaded")
    assert "tiny" in ex.json("GPU Status")["loaded_models"]
    chat = ex.json("Chat")
    assert chat["content"] == HELLO
    assert chat["finish_reason"] == "stop" and chat["usage"]["completion_tokens"] > 0 and chat["tool_calls"] == []
    expected = _expected_prompt(ex)
    assert "- loaded models: tiny (loaded)" in expected and "unloaded first to make room: nothing" in expected
    processed = ex.json("Process Response")
    assert processed["answer"] == HELLO and processed["loaded_models"] == ["tiny"]
    unload = ex.json("Unload Model")
    assert (unload["model"], unload["status"], unload["result"]) == ("tiny", "unloaded", "unloaded")
    assert "tiny" not in _loaded(sidecar)
    _assert_prompt_used(ex, sidecar, expected)


def test_llama_chat_example_not_enough_branch_unloads_what_the_sidecar_names(n8n, capped_sidecar):
    """At most one model may be loaded and another idle one is: the sidecar says tiny does not fit without
    unloading tiny-tools; the Not Enough branch unloads exactly that model, then loads, chats and unloads."""
    code, body = capped_sidecar.call("POST", "/models/load", {"model": "tiny-tools"})
    assert code == 200, body
    ex = n8n.execute("tChatNotEnough")
    assert ex.rc == 0, ex.stderr[-3000:]
    enough, not_enough = ex.outputs("Check VRAM")
    assert enough == [] and len(not_enough) == 1
    check = not_enough[0]["vram_check"]
    assert check["enough"] is False and "tiny-tools" in check["fit"]["evict"] + check["fit"]["evictable"], check
    assert [j["model"] for j in ex.outputs("Models To Unload")[0]] == ["tiny-tools"]
    heavy = ex.json("Unload Idle Model")
    assert (heavy["model"], heavy["status"], heavy["result"]) == ("tiny-tools", "unloaded", "unloaded")
    assert ex.json("Load Model")["result"] == "loaded"
    assert ex.json("Chat")["content"] == HELLO
    expected = _expected_prompt(ex)
    assert "unloaded first to make room: tiny-tools (unloaded)" in expected
    assert ex.json("Unload Model")["result"] == "unloaded"
    assert _loaded(capped_sidecar) == set()
    _assert_prompt_used(ex, capped_sidecar, expected)


def test_llama_chat_example_not_enough_with_nothing_to_unload_says_why(n8n, capped_sidecar):
    """The model that holds the one place has a higher priority: nothing may be unloaded for ours, and the
    workflow stops with that reason instead of loading into a refusal."""
    code, body = capped_sidecar.call("POST", "/models/load", {"model": "tiny-tools", "priority": 90})
    assert code == 200, body
    try:
        ex = n8n.execute("tChatNotEnough")
        assert ex.rc != 0 and not ex.ran("Unload Idle Model") and not ex.ran("Load Model")
        error = json.dumps(ex.error or ex.run_data["Models To Unload"][0].get("error"))
        assert "no idle model of the orchestrator may be unloaded" in error and "at most 1 model" in error, error
        assert _loaded(capped_sidecar) == {"tiny-tools"}
    finally:
        capped_sidecar.call("POST", "/models/unload", {"model": "tiny-tools", "force": True})


def test_unload_takes_any_name_and_old_string_values(n8n, sidecar):
    """By name: another service's reservation (not in the registry) is released; a workflow saved with a plain
    string still unloads, and a model that is not loaded is a 200 result, not an error."""
    code, body = sidecar.call("POST", "/reservations", {"service": "comfyui", "model": "wan2.1-14b", "vram_mb": 1000})
    assert code == 201, body
    ex = n8n.execute("tUnloadByName")
    assert ex.rc == 0, ex.stderr[-3000:]
    out = ex.json("Unload")
    assert (out["model"], out["result"]) == ("wan2.1-14b", "released") and out["released"][0]["id"] == body["id"]
    ex = n8n.execute("tUnloadLegacy")
    assert ex.rc == 0, ex.stderr[-3000:]
    out = ex.json("Unload")
    assert out["model"] == "tiny" and out["result"] == "not_loaded", out


def test_check_vram_branches(n8n, sidecar):
    # required 0 MB; CPU mode counted as not enough: the second output
    ex = n8n.execute("tVramZero")
    assert ex.rc == 0, ex.stderr[-3000:]
    assert ex.ran("Not Enough") and not ex.ran("Enough")
    # a loaded model is always "enough" for itself, without an estimate, also when asked for by an alias
    code, body = sidecar.call("POST", "/models/load", {"model": "tiny"})
    assert code == 200, body
    try:
        ex = n8n.execute("tVramLoaded")
        assert ex.rc == 0, ex.stderr[-3000:]
        assert ex.ran("Enough") and not ex.ran("Not Enough")
        check = ex.json("Check VRAM")["vram_check"]
        assert "tiny-alias is already loaded" in check["reason"] and check["model"] == "tiny", check
    finally:
        sidecar.call("POST", "/models/unload", {"model": "tiny", "force": True})


def test_check_vram_enough_for_model_uses_the_estimate(n8n, sidecar):
    ex = n8n.execute("tVramModel")
    assert ex.rc == 0, ex.stderr[-3000:]
    check = ex.json("Check VRAM")["vram_check"]
    assert check["model"] == "tiny" and isinstance(check["required_mb"], int) and check["gpu"] is False
    assert check["required_mb"] > 0 and check["fit"]["fits_after_eviction"] is True  # the sidecar's own verdict
    assert ex.ran("Enough") and not ex.ran("Not Enough")


def test_agent_answers_through_the_local_model(n8n, sidecar):
    assert "tiny" not in _loaded(sidecar)
    ex = n8n.execute("tAgent")
    assert ex.rc == 0, ex.stderr[-3000:]
    assert ex.json("AI Agent")["output"] == HELLO
    assert "tiny" in _loaded(sidecar)  # loaded on demand by the chat request
    sidecar.call("POST", "/models/unload", {"model": "tiny", "force": True})


def test_describe_image_sends_the_binary_as_a_data_url(n8n, sidecar):
    ex = n8n.execute("tImage")
    assert ex.rc == 0, ex.stderr[-3000:]
    out = ex.json("Describe Image")
    assert out["content"] == HELLO and out["images_sent"] == 1
    assert ex.json("Description") == {"description": HELLO, "model": "tiny-vision"} and not ex.ran("No Vision Model")
    # the same text without the image costs fewer prompt tokens: the image became tokens
    image_wf = load_workflow("describe-image.json")
    params = next(n for n in image_wf["nodes"] if n["name"] == "Describe Image")["parameters"]
    code, plain = sidecar.call("POST", "/v1/chat/completions", {
        "model": "tiny-vision", "temperature": 0.2, "max_tokens": 200,
        "messages": [{"role": "system", "content": params["systemPrompt"]},
                     {"role": "user", "content": [{"type": "text", "text": params["userMessage"]}]}]})
    assert code == 200, plain
    assert out["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]


def test_errors_carry_the_sidecar_message(n8n, sidecar):
    # an unknown model: Load Model fails as an n8n API error with the sidecar's message, the workflow stops
    ex = n8n.execute("tChatUnknown")
    assert ex.rc != 0 and not ex.ran("Chat")
    error = ex.error or ex.run_data["Check VRAM"][0].get("error")
    assert "unknown model 'no-such-model'" in error["message"], error
    assert error.get("name") == "NodeApiError" or "NodeApiError" in json.dumps(error), error
    # an image for a model without a projector: the sidecar's own 400 naming the fix; the shipped workflow goes on
    # to No Vision Model, which says what to change (a run that ends green)
    ex = n8n.execute("tImageNoVision")
    assert ex.rc == 0, ex.stderr[-3000:]
    out = ex.json("Describe Image")
    assert out["code"] == "vision_not_supported" and "mmproj" in out["error"], out
    said = ex.json("No Vision Model")
    assert said["described"] is False and said["model"] == "tiny" and "vision projector" in said["fix"], said
    assert not ex.ran("Description")


def test_chat_tools_give_tool_calls(n8n, sidecar):
    ex = n8n.execute("tToolsContinue")
    assert ex.rc == 0, ex.stderr[-3000:]
    chat = ex.json("Chat")
    assert chat["finish_reason"] == "tool_calls", chat
    assert chat["tool_calls"][0]["name"] == "get_weather"
    assert isinstance(chat["tool_calls"][0]["arguments"], dict), chat["tool_calls"]


def test_api_key_is_sent_as_bearer(n8n, keyed_sidecar):
    ex = n8n.execute("tChatKeyed")
    assert ex.rc == 0, ex.stderr[-3000:]
    assert ex.json("Chat")["content"] == HELLO
    ex = n8n.execute("tAgentKeyed")  # the AI sub-node too (base URL given with /v1/ in this credential)
    assert ex.rc == 0, ex.stderr[-3000:]
    assert ex.json("AI Agent")["output"] == HELLO
    # the requests went to the keyed sidecar: it loaded tiny-generated on demand
    req = urllib.request.Request(keyed_sidecar.url + "/models/status", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.loads(r.read())["loaded_models"]["tiny-generated"]["status"] == "loaded"
    ex = n8n.execute("tChatWrongKey")
    assert ex.rc != 0
    error = ex.error or ex.run_data["Check VRAM"][0].get("error")
    assert "missing or wrong API key" in json.dumps(error), error
