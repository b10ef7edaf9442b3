"""LoRA adapters against a real llama-server: a generated adapter for the tiny 'hello' model turns its answer from
HELLO_TEXT into LORA_TEXT, at the registry's scale, per request (`lora` in a chat), and at run time through
POST /models/{model}/lora-adapters; the registry's validation, the command line and the estimate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model_orchestrator.files.estimate import MIB, estimate_headers
from model_orchestrator.files.gguf_header import read_header, read_model_headers
from model_orchestrator.files.llama_args import lora_args
from model_orchestrator.files.registry import RegistryError, parse_registry
from support.helpers import CHAT, read_sse
from support.registry import fixture_models, model, registry_toml, write_registry
from support.hf_mirror import HfMirror
from support.tiny_models import HELLO_TEXT, LORA_TEXT, write_tiny_lora


@pytest.fixture(scope="session")
def lora_file(model_dir) -> Path:
    return write_tiny_lora(model_dir / "lora-terse.gguf")


@pytest.fixture
def registry_file(tmp_path, model_dir, lora_file) -> Path:
    """The fixture registry plus models with the tiny LoRA (off by default, on by default, a missing file)."""
    hello = model_dir / "hello.gguf"
    terse = {"name": "terse", "source": {"type": "path", "path": str(lora_file)}}
    gone = {"name": "gone", "source": {"type": "path", "path": str(model_dir / "no-such-lora.gguf")}}
    return write_registry(tmp_path / "models.toml", *fixture_models(model_dir),
                          model("tiny-lora", path=hello, context_size=512, lora=[{**terse, "scale": 0}]),
                          model("tiny-lora-on", path=hello, context_size=512, lora=[terse]),
                          model("tiny-lora-missing", path=hello, context_size=512, lora=[gone]))


async def chat(client, model, **kw):
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": model, **kw})
    body = await r.json()
    assert r.status == 200, body
    return body["choices"][0]["message"]["content"]


async def error(resp, status, code):
    body = await resp.json()
    assert resp.status == status and body["error"]["code"] == code, body
    return body["error"]


async def test_a_lora_changes_the_answer_per_request_and_at_run_time(client):
    models = {m["id"]: m for m in (await (await client.get("/models")).json())["models"]}
    assert [(a["name"], a["scale"], a["source"]["type"]) for a in models["tiny-lora"]["lora"]] == [("terse", 0, "path")]
    assert models["tiny"]["lora"] == []
    r = await client.get("/models/tiny-lora/lora-adapters")
    assert await r.json() == {"model": "tiny-lora", "status": "unloaded",
                              "adapters": [{"name": "terse", "id": 0, "scale": 0.0, "default_scale": 0.0}]}
    # scales are set on a loaded model only
    err = await error(await client.post("/models/tiny-lora/lora-adapters",
                                        json={"adapters": [{"name": "terse", "scale": 1}]}), 409, "model_not_loaded")
    assert "POST /models/load" in err["message"]

    # the registry's scale 0: loaded, not applied
    assert await chat(client, "tiny-lora") == HELLO_TEXT
    # per request, by name or by llama-server's id; it does not stick
    assert await chat(client, "tiny-lora", lora=[{"name": "terse", "scale": 1}]) == LORA_TEXT
    assert await chat(client, "tiny-lora", lora=[{"id": 0, "scale": 1.0}]) == LORA_TEXT
    assert await chat(client, "tiny-lora") == HELLO_TEXT
    r = await client.post("/v1/completions", json={"model": "tiny-lora", "prompt": "hi", "max_tokens": 8,
                                                   "lora": [{"name": "terse", "scale": 1}]})
    assert (await r.json())["choices"][0]["text"] == LORA_TEXT  # plain completions too
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": "tiny-lora", "stream": True,
                                                       "lora": [{"name": "terse", "scale": 1}]})
    events = [e for e in await read_sse(r) if e != "[DONE]"]
    assert "".join(c["delta"].get("content") or "" for e in events for c in e["choices"]) == LORA_TEXT
    status = await (await client.get("/models/status")).json()
    assert status["loaded_models"]["tiny-lora"]["lora"] == [{"name": "terse", "id": 0, "scale": 0.0}]

    # at run time, through the sidecar: the status shows it at once, later requests answer with the adapter
    events = client.orch.events.subscribe(types={"lora"}, models=None, last_event_id=None)
    r = await client.post("/models/tiny-lora/lora-adapters", json={"adapters": [{"name": "terse", "scale": 1}]})
    body = await r.json()
    assert r.status == 200 and body["adapters"] == [{"name": "terse", "id": 0, "scale": 1.0, "default_scale": 0.0}]
    status = await (await client.get("/models/status")).json()
    assert status["loaded_models"]["tiny-lora"]["lora"] == [{"name": "terse", "id": 0, "scale": 1.0}]
    event = await events.next(5)
    assert (event.type, event.model, event.data["scales"]) == ("lora", "tiny-lora", {"terse": 1.0})
    events.close()
    assert await chat(client, "tiny-lora") == LORA_TEXT
    assert await chat(client, "tiny-lora", lora=[{"name": "terse", "scale": 0}]) == HELLO_TEXT  # a request overrides
    assert await chat(client, "tiny-lora", lora=[]) == LORA_TEXT  # names nothing: the model's scales stay
    server = client.orch.models["tiny-lora"].server
    async with server.request("GET", "/lora-adapters") as r:  # what llama-server itself says
        assert [(a["id"], a["scale"]) for a in await r.json()] == [(0, 1.0)]

    # each load starts from the registry's scales
    await client.post("/models/unload", json={"model": "tiny-lora"})
    r = await client.get("/models/tiny-lora/lora-adapters")
    assert (await r.json())["adapters"][0]["scale"] == 0.0
    assert await chat(client, "tiny-lora") == HELLO_TEXT


async def test_the_registrys_scale_applies_from_the_load_on(client, lora_file):
    assert await chat(client, "tiny-lora-on") == LORA_TEXT
    argv = client.orch.models["tiny-lora-on"].server.plan.argv
    assert argv[argv.index("--lora-scaled") + 1] == f"{lora_file}:1"
    assert await chat(client, "tiny-lora-on", lora=[{"name": "terse", "scale": 0}]) == HELLO_TEXT
    r = await client.post("/models/tiny-lora-on/lora-adapters", json={"adapters": [{"name": "terse", "scale": 0}]})
    assert r.status == 200
    assert await chat(client, "tiny-lora-on") == HELLO_TEXT


async def test_bad_adapter_requests_are_refused_with_what_to_do_and_load_nothing(client):
    cases = [
        ([{"name": "nope", "scale": 1}], 400, "unknown_adapter", "its adapters: terse"),
        ([{"id": 3, "scale": 1}], 400, "unknown_adapter", "its adapters: terse"),
        ([{"name": "terse", "scale": -1}], 400, "invalid_request", "lora.0.scale"),
        ([{"name": "terse", "scale": 11}], 400, "invalid_request", "lora.0.scale"),
        ([{"name": "terse", "scale": "1"}], 400, "invalid_request", "lora.0.scale"),
        ([{"name": "terse", "id": 0, "scale": 1}], 400, "invalid_request", "either name or id"),
        ([{"name": "terse"}], 400, "invalid_request", "lora.0.scale"),
        ({"terse": 1}, 400, "invalid_request", "lora"),
    ]
    for lora, status, code, said in cases:
        r = await client.post("/v1/chat/completions", json={**CHAT, "model": "tiny-lora", "lora": lora})
        err = await error(r, status, code)
        assert said in err["message"], (lora, err)
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": "tiny", "lora": [{"name": "x", "scale": 1}]})
    assert "add `lora` to its entry" in (await error(r, 400, "unknown_adapter"))["message"]
    # the sidecar's route
    r = await client.post("/models/tiny-lora/lora-adapters", json={"adapters": [{"name": "nope", "scale": 1}]})
    err = await error(r, 400, "unknown_adapter")
    assert err["adapters"] == ["terse"]
    r = await client.post("/models/tiny-lora/lora-adapters", json={"adapters": [{"name": "terse", "scale": -0.5}]})
    assert "adapters.0.scale" in (await error(r, 400, "invalid_request"))["message"]
    r = await client.post("/models/tiny-lora/lora-adapters", json={"adapters": [{"name": "terse", "scale": 1}] * 2})
    await error(r, 400, "invalid_request")
    await error(await client.get("/models/nope/lora-adapters"), 404, "model_not_found")
    # nothing was loaded by a refused request
    assert all(m.server is None for m in client.orch.models.values())
    # a missing adapter file: the load is refused before anything starts, naming the adapter
    r = await client.post("/models/load", json={"model": "tiny-lora-missing"})
    err = await error(r, 409, "model_files_missing")
    assert "LoRA adapter 'gone'" in err["message"] and "no-such-lora.gguf" in err["message"]


def _adapter(name: str = "a", path: str | None = "/x.gguf", **fields) -> dict:
    return {"name": name, **({"source": {"type": "path", "path": path}} if path else {}), **fields}


@pytest.mark.parametrize("lora, says", [
    ([_adapter(scale=-1)], "greater than or equal to 0"),
    ([_adapter(scale=1000)], "less than or equal to 10"),
    ([_adapter(), _adapter(path="/y.gguf")], "used twice"),
    ([_adapter(path="/x:1.gguf")], "cannot take a path with ':'"),
    ([_adapter(path=None, source={"type": "hf", "repo": "o/r", "file": "../x.gguf"})], "inside the repo"),
    ([_adapter("a b")], "should match pattern"),
    ([{"name": "a", "path": "/x.gguf"}], "Extra inputs are not permitted"),
])
def test_the_registry_refuses_bad_adapters_naming_the_field(lora, says):
    with pytest.raises(RegistryError) as exc:
        parse_registry(registry_toml(model("m", lora=lora)))
    assert "models.0.lora" in str(exc.value) and says in str(exc.value), str(exc.value)


def test_adapters_are_resolved_relative_to_the_registry_and_hub_ones_like_models(tmp_path):
    hub = _adapter("b", path=None, source={"type": "hf", "repo": "o/r", "file": "b.gguf"})
    reg = parse_registry(registry_toml(model("m", lora=[_adapter(path="adapters/a.gguf", scale=0.5), hub])),
                         str(tmp_path / "models.toml"))
    a, b = reg.models[0].lora
    assert a.source.path == tmp_path / "adapters" / "a.gguf" and a.scale == 0.5
    assert (b.source.repo, b.source.file, b.source.revision, b.scale) == ("o/r", "b.gguf", "main", 1.0)


def test_lora_flags_are_the_registrys_and_paths_are_quoted_for_llama_server(tmp_path):
    assert lora_args([(Path("/m/a.gguf"), 1.0), (Path("/m/b,c.gguf"), 0.25)]) == [
        "--lora-scaled", "/m/a.gguf:1", "--lora-scaled", '"/m/b,c.gguf":0.25']
    with pytest.raises(RegistryError, match="--lora-scaled is set by the orchestrator"):
        parse_registry(registry_toml(model("m", extra_args=["--lora-scaled", "/x.gguf:1"])))


def test_the_estimate_grows_by_the_adapters_tensors(model_dir, lora_file):
    hello = model_dir / "hello.gguf"
    adapter_bytes = sum(t.n_bytes for t in read_header(lora_file).tensors)
    assert adapter_bytes > 0
    base = estimate_headers(read_model_headers(hello), n_ctx=512, n_gpu_layers=99)
    with_lora = estimate_headers(read_model_headers(hello, lora=[lora_file]), n_ctx=512, n_gpu_layers=99)
    assert with_lora.lora_mb == pytest.approx(adapter_bytes / MIB)
    assert with_lora.total_mb - base.total_mb == pytest.approx(adapter_bytes / MIB)
    assert base.lora_mb == 0
    # the adapter goes where its base tensor (output.weight) goes: nothing on the GPU without GPU layers
    assert estimate_headers(read_model_headers(hello, lora=[lora_file]), n_ctx=512, n_gpu_layers=0).lora_mb == 0


async def test_the_estimate_route_counts_the_adapters(client, lora_file):
    adapter_mb = sum(t.n_bytes for t in read_header(lora_file).tensors) / MIB
    plain = (await (await client.post("/models/estimate", json={"model": "tiny"})).json())["estimate"]
    lora = (await (await client.post("/models/estimate", json={"model": "tiny-lora"})).json())["estimate"]
    assert plain["lora_mb"] == 0 and lora["lora_mb"] == pytest.approx(adapter_mb, abs=0.05)
    assert lora["total_mb"] - plain["total_mb"] == pytest.approx(adapter_mb, abs=0.1)
    assert lora["details"]["lora_adapters"] == 1


def test_hub_adapters_are_estimated_before_download_and_pulled_with_the_model(tmp_path, model_dir, lora_file):
    """An adapter from the Hub: its header is read remotely for the estimate, `pull` fetches it into the HF cache
    with the model, and a load then finds it there (the same resolution as a model's files)."""
    mirror = HfMirror({"org/tiny-GGUF": {"hello.gguf": (model_dir / "hello.gguf").read_bytes()},
                       "org/tiny-lora": {"terse.gguf": lora_file.read_bytes()}})
    mirror.start()
    try:
        terse = {"name": "terse", "source": {"type": "hf", "repo": "org/tiny-lora", "file": "terse.gguf"}}
        registry = write_registry(tmp_path / "models.toml",
                                  model("m", hf="org/tiny-GGUF", file="hello.gguf", lora=[terse]))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODEL_ORCHESTRATOR_"))}
        env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=mirror.url, MODEL_ORCHESTRATOR_MODELS=str(registry),
                   MODEL_ORCHESTRATOR_STATE=str(tmp_path / "state"), MODEL_ORCHESTRATOR_URL="http://127.0.0.1:9")

        def cli(*args):
            return subprocess.run([sys.executable, "-m", "model_orchestrator", *args], env=env, capture_output=True,
                                  text=True, timeout=120)

        est = cli("estimate", "m", "--json")
        assert est.returncode == 0, est.stderr
        adapter_mb = sum(t.n_bytes for t in read_header(lora_file).tensors) / MIB
        data = json.loads(est.stdout)
        assert data["details"]["header_from"] == "hub" and data["lora_mb"] == pytest.approx(adapter_mb, abs=0.05)
        assert "LoRA adapters" in cli("estimate", "m").stdout
        pulled = cli("pull", "m")
        assert pulled.returncode == 0, pulled.stderr
        paths = pulled.stdout.split()
        assert len(paths) == 2 and paths[1].endswith("terse.gguf") and paths[1].startswith(str(tmp_path / "hf"))
        assert Path(paths[1]).read_bytes() == lora_file.read_bytes()
    finally:
        mirror.stop()
