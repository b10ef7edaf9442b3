"""The HTTP API against a real llama-server serving tiny generated models (in-process sidecar)."""

import asyncio
import json
import os
import signal
import time


from support.helpers import CHAT, pid_alive, read_sse
from support.tiny_models import HELLO_TEXT, TOOL_CALL

GUIDE_STATUS_KEYS = {"total_mb", "used_mb", "free_mb", "utilization_percent", "loaded_models"}


async def load(client, model, **kw):
    r = await client.post("/models/load", json={"model": model, **kw})
    return r.status, await r.json()


async def chat(client, model, **kw):
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": model, **kw})
    return r.status, await r.json()


def assert_error(body, code):
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"] and body["error"]["type"]


async def test_status_in_cpu_mode_has_the_guides_shape_and_no_invented_numbers(client):
    r = await client.get("/models/status")
    body = await r.json()
    assert r.status == 200
    assert GUIDE_STATUS_KEYS <= set(body)
    assert body["mode"] == "cpu" and body["total_mb"] is None and body["free_mb"] is None and body["gpus"] == []
    assert "CPU mode" in body["note"]
    assert body["loaded_models"] == {}


async def test_load_chat_status_unload(client):
    status, body = await load(client, "tiny", priority=7)
    assert status == 200 and body["result"] == "loaded" and body["status"] == "loaded", body
    pid, port = body["pid"], body["port"]
    assert port is None  # llama-server has no TCP port (a private Unix socket)
    assert pid_alive(pid)

    st = await (await client.get("/models/status")).json()
    entry = st["loaded_models"]["tiny"]
    assert {"model", "service", "loaded_at", "status"} <= set(entry)  # the guide's fields
    assert entry["model"] == "tiny" and entry["service"] == "llama-cpp" and entry["status"] == "loaded"
    assert entry["pid"] == pid and entry["port"] == port and entry["priority"] == 7 and entry["context_size"] == 512
    assert entry["vram_mb"] is None  # CPU mode: not measured, not invented

    status, body = await chat(client, "tiny")
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == HELLO_TEXT
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["model"] == "tiny" and body["usage"]["completion_tokens"] > 0

    status, body = await chat(client, "tiny-alias")  # aliases route to the same server
    assert status == 200 and body["choices"][0]["message"]["content"] == HELLO_TEXT

    status, body = await load(client, "tiny")
    assert body["result"] == "already_loaded" and body["pid"] == pid

    r = await client.post("/models/unload", json={"model": "tiny"})
    assert (r.status, (await r.json())["result"]) == (200, "unloaded")
    assert not pid_alive(pid)
    st = await (await client.get("/models/status")).json()
    assert "tiny" not in st["loaded_models"]
    r = await client.post("/models/unload", json={"model": "tiny"})
    assert (await r.json())["result"] == "not_loaded"


async def test_streaming_is_passed_through_chunk_by_chunk(client):
    await load(client, "tiny")
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": "tiny", "stream": True})
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    events = await read_sse(r)
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"].get("content") for e in events[:-1] if e["choices"]]
    assert "".join(d for d in deltas if d) == HELLO_TEXT
    assert len([d for d in deltas if d]) >= 5  # one event per token, not one buffered blob
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    metrics = await (await client.get("/metrics")).text()
    assert 'llamacpp_tokens_generated_total{model="tiny"}' in metrics


async def test_streamed_chunks_arrive_before_the_generation_ends(client):
    """A long generation: the first event reaches the client long before the last is produced."""
    await load(client, "tiny-random")
    t0 = time.perf_counter()
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": "tiny-random", "stream": True,
                                                       "max_tokens": 3000, "ignore_eos": True})
    first = None
    n = 0
    async for chunk in r.content.iter_any():
        if b'"content":"' in chunk and first is None:
            first = time.perf_counter() - t0
        n += chunk.count(b"data: ")
    total = time.perf_counter() - t0
    assert n > 100 and first is not None  # byte tokens that split a UTF-8 character share an event
    assert first < total / 3, (first, total)


async def test_an_answer_stops_at_the_models_max_tokens_unless_the_request_names_its_own(aiohttp_client,
                                                                                          make_orchestrator,
                                                                                          registry_file):
    """A model that never stops (random weights, EOS ignored) ends at its registry max_tokens when the request names
    no limit; a request's max_tokens, max_completion_tokens or n_predict wins, also above the model's."""
    from model_orchestrator.server.api import create_app

    registry_file.write_text(registry_file.read_text().replace(
        'id = "tiny-random"', 'id = "tiny-random"\nmax_tokens = 7'))
    c = await aiohttp_client(create_app(make_orchestrator()))
    ask = {**CHAT, "model": "tiny-random", "ignore_eos": True}
    for extra, expected in (({}, 7), ({"max_tokens": 12}, 12), ({"max_completion_tokens": 3}, 3),
                            ({"n_predict": 9}, 9)):
        r = await c.post("/v1/chat/completions", json={**ask, **extra})
        body = await r.json()
        assert r.status == 200, body
        assert (body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]) == (expected, "length"), extra
    r = await c.post("/v1/chat/completions", json={**ask, "stream": True})
    events = await read_sse(r)
    assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e.get("choices")][-1] == "length"
    assert events[-2]["timings"]["predicted_n"] == 7, events[-2]


async def test_tools_are_passed_through_and_tool_calls_come_back(client):
    parameters = {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Get current weather",
                                               "parameters": parameters}}]
    status, body = await chat(client, "tiny-tools", tools=tools, tool_choice="auto")
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]["function"]
    assert call["name"] == TOOL_CALL["name"] and json.loads(call["arguments"]) == TOOL_CALL["arguments"]
    # streamed too
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": "tiny-tools", "tools": tools, "stream": True})
    events = [e for e in await read_sse(r) if e != "[DONE]"]
    names = [tc["function"].get("name")
             for e in events for c in e["choices"] for tc in c["delta"].get("tool_calls", [])]
    assert "get_weather" in names
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


PNG = ("data:image/png;base64,"
       "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
IMAGE_MSG = [{"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                                          {"type": "image_url", "image_url": {"url": PNG}}]}]


async def test_image_request_reaches_the_vision_model(client):
    """A model with a (tiny, generated) multimodal projector: the image is encoded into prompt tokens."""
    with_image = await client.post("/v1/chat/completions", json={"model": "tiny-vision", "messages": IMAGE_MSG})
    body = await with_image.json()
    assert with_image.status == 200, body
    assert body["choices"][0]["message"]["content"] == HELLO_TEXT
    text_only = [{"role": "user", "content": [{"type": "text", "text": "What is in this image?"}]}]
    r = await client.post("/v1/chat/completions", json={"model": "tiny-vision", "messages": text_only})
    plain = await r.json()
    assert body["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]  # the image became tokens
    models = await (await client.get("/models")).json()
    assert next(m for m in models["models"] if m["id"] == "tiny-vision")["vision"] is True


async def test_image_to_a_text_only_model_is_a_clear_400_naming_the_projector(client):
    """llama-server would answer 500 ("image input is not supported"): the sidecar names the fix first, before
    loading anything."""
    r = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": IMAGE_MSG})
    body = await r.json()
    assert r.status == 400 and body["error"]["code"] == "vision_not_supported", body
    assert "mmproj" in body["error"]["message"] and client.orch.models["tiny"].state.value == "unloaded"


async def test_load_on_demand_and_requests_during_a_load_wait(client):
    results = await asyncio.gather(*(chat(client, "tiny") for _ in range(4)))
    assert all(s == 200 and b["choices"][0]["message"]["content"] == HELLO_TEXT for s, b in results)
    loads = client.orch.metrics.loads.labels("tiny", "loaded")._value.get()
    assert loads == 1  # one process for four requests


async def test_generated_default_model_is_made_on_first_load(client):
    status, body = await load(client, "tiny-generated")
    assert status == 200, body
    assert (client.orch.settings.generated_dir / "tiny-generated.gguf").is_file()
    assert (await chat(client, "tiny-generated"))[1]["choices"][0]["message"]["content"] == HELLO_TEXT


async def test_model_without_on_demand_load_is_refused_until_loaded(client):
    status, body = await chat(client, "tiny-manual")
    assert status == 409
    assert_error(body, "model_not_loaded")
    assert client.orch.models["tiny-manual"].state.value == "unloaded"


async def test_two_concurrent_loads_share_one_process(client):
    (s1, b1), (s2, b2) = await asyncio.gather(load(client, "tiny"), load(client, "tiny"))
    assert s1 == s2 == 200
    assert sorted([b1["result"], b2["result"]]) == ["joined", "loaded"]
    assert b1["pid"] == b2["pid"]


async def test_unknown_model_bad_json_and_bad_fields_are_clear_4xx(client):
    for path in ("/models/load", "/models/estimate", "/v1/chat/completions"):
        body = {"model": "no-such-model", "messages": []} if "v1" in path else {"model": "no-such-model"}
        r = await client.post(path, json=body)
        assert r.status == 404, path
        assert_error(await r.json(), "model_not_found")
    r = await client.post("/models/load", data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status == 400
    assert_error(await r.json(), "invalid_json")
    r = await client.post("/models/load", json={"model": "tiny", "priorty": 3})
    body = await r.json()
    assert r.status == 400 and body["error"]["problems"][0]["field"] == "priorty"
    r = await client.post("/models/load", json={"model": "tiny", "priority": "high"})
    assert r.status == 400 and "priority" in (await r.json())["error"]["message"]
    r = await client.post("/models/load", json={"model": "../../etc/passwd"})
    assert r.status == 400
    r = await client.get("/nope")
    assert r.status == 404
    assert_error(await r.json(), "not_found")
    r = await client.get("/models/load")
    assert r.status == 405
    assert_error(await r.json(), "method_not_allowed")
    assert all(s.state.value == "unloaded" for s in client.orch.models.values())  # nothing spawned


async def test_a_model_that_cannot_start_answers_with_llama_servers_last_log_lines(client):
    status, body = await load(client, "broken")
    assert status == 503, body
    err = body["error"]
    assert err["code"] == "process_exited" and err["model"] == "broken"
    assert any("failed to load model" in line or "error" in line.lower() for line in err["logs"]), err["logs"]
    st = await (await client.get("/models/status")).json()
    assert st["loaded_models"]["broken"]["status"] == "failed"
    assert st["loaded_models"]["broken"]["error"]["code"] == "process_exited"
    r = await client.get("/models/broken/logs")
    assert (await r.json())["lines"]
    r = await client.post("/models/unload", json={"model": "broken"})  # failed -> unloaded clears it
    assert (await r.json())["status"] == "unloaded"


async def test_a_load_that_never_becomes_ready_times_out_with_logs_and_leaves_no_process(client):
    t0 = time.perf_counter()
    status, body = await load(client, "hangs", timeout_s=1.5)
    assert status == 503 and body["error"]["code"] == "load_timeout", body
    assert 1.4 < time.perf_counter() - t0 < 10
    assert body["error"]["logs"]
    assert client.orch.models["hangs"].state.value == "failed"
    assert client.orch.owned_pids() == {}


async def test_unload_during_loading_cancels_it_cleanly(client):
    task = asyncio.ensure_future(load(client, "hangs"))
    slot = client.orch.models["hangs"]
    for _ in range(500):
        if slot.server and slot.server.pid:
            break
        await asyncio.sleep(0.01)
    pid = slot.server.pid
    assert slot.state.value == "loading"
    r = await client.post("/models/unload", json={"model": "hangs"})
    assert (r.status, (await r.json())["result"]) == (200, "cancelled_load")
    status, body = await task
    assert status == 409 and body["error"]["code"] == "load_cancelled"
    assert slot.state.value == "unloaded" and not pid_alive(pid)


async def test_kill_9_of_llama_server_is_seen_within_a_second_and_the_next_request_reloads(client):
    _, body = await load(client, "tiny")
    pid = body["pid"]
    os.kill(pid, signal.SIGKILL)
    slot = client.orch.models["tiny"]
    t0 = time.perf_counter()
    while slot.state.value != "failed" and time.perf_counter() - t0 < 1.0:
        await asyncio.sleep(0.005)
    noticed = time.perf_counter() - t0
    assert slot.state.value == "failed", "crash not noticed within 1 s"
    st = await (await client.get("/models/status")).json()
    err = st["loaded_models"]["tiny"]["error"]
    assert err["code"] == "process_exited" and "SIGKILL" in err["message"]
    print(f"crash noticed after {noticed * 1000:.1f} ms")
    status, body = await chat(client, "tiny")  # load on demand brings it back
    assert status == 200 and body["choices"][0]["message"]["content"] == HELLO_TEXT
    assert slot.state.value == "loaded" and slot.server.pid != pid


async def _start_long_stream(client, model="tiny-random", max_tokens=3000):
    await load(client, model)
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": model, "stream": True,
                                                       "max_tokens": max_tokens, "ignore_eos": True})
    assert r.status == 200
    await r.content.readuntil(b"\n\n")  # the stream is running
    return r


async def test_kill_9_mid_stream_gives_the_client_a_clear_error(client):
    r = await _start_long_stream(client)
    os.kill(client.orch.models["tiny-random"].server.pid, signal.SIGKILL)
    events = await read_sse(r)
    last = events[-1]
    assert last != "[DONE]" and last["error"]["code"] == "model_crashed", last
    assert client.orch.models["tiny-random"].state.value == "failed"


async def test_force_unload_during_a_stream_ends_it_with_an_error(client):
    r = await _start_long_stream(client)
    pid = client.orch.models["tiny-random"].server.pid
    u = await client.post("/models/unload", json={"model": "tiny-random", "force": True})
    assert (await u.json())["result"] == "unloaded"
    events = await read_sse(r)
    assert events[-1] != "[DONE]" and events[-1]["error"]["code"] == "model_unloaded", events[-1]
    assert not pid_alive(pid)
    assert client.orch.models["tiny-random"].in_flight == 0


async def test_unload_without_force_refuses_after_the_drain_timeout_and_changes_nothing(client):
    r = await _start_long_stream(client)
    slot = client.orch.models["tiny-random"]
    pid = slot.server.pid
    u = await client.post("/models/unload", json={"model": "tiny-random", "drain_timeout_s": 0.2})
    body = await u.json()
    assert u.status == 409 and body["error"]["code"] == "model_busy" and body["error"]["in_flight"] == 1
    assert slot.state.value == "loaded" and slot.server.pid == pid and not slot.draining
    await client.post("/models/unload", json={"model": "tiny-random", "force": True})
    await read_sse(r)


async def test_unload_without_force_waits_for_requests_in_flight(client):
    await load(client, "tiny")
    slot = client.orch.models["tiny"]
    with slot.request():  # a request in flight, held open by the test for as long as it likes
        u = asyncio.ensure_future(client.post("/models/unload", json={"model": "tiny"}))
        await asyncio.sleep(0.2)
        assert slot.draining and slot.state.value == "loaded" and not u.done()
        # new work waits in the queue meanwhile (it never reaches the model being unloaded)
        c = asyncio.ensure_future(client.post("/v1/chat/completions", json={**CHAT, "model": "tiny"}))
        await asyncio.sleep(0.3)
        assert not c.done() and slot.in_flight == 1
    resp = await u
    assert (resp.status, (await resp.json())["result"]) == (200, "unloaded")
    c = await c  # then the model loads again for it (load on demand) and it is answered
    assert c.status == 200 and int(c.headers["X-Queue-Wait-Ms"]) >= 300, await c.text()


async def test_a_stream_in_flight_finishes_normally_before_an_unload_without_force(client):
    r = await _start_long_stream(client, max_tokens=60)
    u = asyncio.ensure_future(client.post("/models/unload", json={"model": "tiny-random"}))
    events = await read_sse(r)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    resp = await u
    assert (resp.status, (await resp.json())["result"]) == (200, "unloaded")


async def test_metrics_have_the_guides_names_and_the_orchestrators(client):
    await chat(client, "tiny")
    await load(client, "broken")
    text = await (await client.get("/metrics")).text()
    for name in ("llamacpp_tokens_generated_total", "llamacpp_prompt_tokens_total", "llamacpp_requests_total",
                 "llamacpp_requests_duration_seconds_bucket", "model_orchestrator_model_state",
                 "model_orchestrator_load_duration_seconds_bucket", "model_orchestrator_model_loads_total",
                 "model_orchestrator_model_failures_total", "model_orchestrator_http_requests_total",
                 "model_orchestrator_gpu_available 0.0"):
        assert name in text, name
    assert 'model_orchestrator_model_state{model="tiny",state="loaded"} 1.0' in text
    assert 'model_orchestrator_model_state{model="broken",state="failed"} 1.0' in text
    assert 'llamacpp_requests_total{endpoint="chat_completions",model="tiny",status="200"} 1.0' in text


async def test_v1_models_and_models_list_the_registry(client):
    body = await (await client.get("/v1/models")).json()
    assert body["object"] == "list" and {m["id"] for m in body["data"]} >= {"tiny", "tiny-tools"}
    body = await (await client.get("/models")).json()
    assert body["default_model"] == "tiny"
    tiny = next(m for m in body["models"] if m["id"] == "tiny")
    assert tiny["aliases"] == ["tiny-alias"] and tiny["files_present"] and tiny["status"] == "unloaded"


async def test_openapi_comes_from_the_request_models_and_docs_work_offline(client):
    from model_orchestrator.server.api import ROUTES
    from model_orchestrator.server.openapi import json_schema_bounds
    from model_orchestrator.server.schemas import LoadRequest

    spec = await (await client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.1")
    for r in ROUTES:
        assert r.method.lower() in spec["paths"][r.path], r.path
    assert spec["components"]["schemas"]["LoadRequest"] == json_schema_bounds(
        LoadRequest.model_json_schema(ref_template="#/components/schemas/{model}"))
    html = await (await client.get("/docs")).text()
    assert "swagger-ui-bundle.js" in html and "http://" not in html.split("<body")[1].split("</body>")[0]
    js = await client.get("/docs/static/swagger-ui-bundle.js")
    assert js.status == 200 and len(await js.read()) > 500_000
    assert (await client.get("/docs/openapi.json")).status == 200


async def test_api_key_guards_every_route_but_health_metrics_and_docs(aiohttp_client, make_orchestrator):
    from model_orchestrator.server.api import create_app

    orch = make_orchestrator(api_key="s3cret")
    c = await aiohttp_client(create_app(orch))
    for path in ("/models/status", "/models", "/v1/models"):
        r = await c.get(path)
        assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert_error(await r.json(), "invalid_api_key")
        r = await c.get(path, headers={"Authorization": "Bearer wrong"})
        assert r.status == 401
        r = await c.get(path, headers={"Authorization": "Bearer s3cret"})
        assert r.status == 200, path
    r = await c.post("/models/load", json={"model": "tiny"})
    assert r.status == 401
    assert all(s.state.value == "unloaded" for s in orch.models.values())  # refused before anything ran
    for path in ("/health", "/metrics", "/docs", "/openapi.json"):
        assert (await c.get(path)).status == 200, path


def test_usage_scanner_finds_counts_split_across_chunks():
    from model_orchestrator.server.proxy import UsageScanner

    final = b'data: {"choices":[],"timings":{"prompt_n":12,"predicted_n":34}}\n\n'
    stream = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n' * 3 + final + b"data: [DONE]\n\n"
    for cut in range(1, len(stream)):
        s = UsageScanner()
        s.feed(stream[:cut])
        s.feed(stream[cut:])
        assert (s.prompt_tokens, s.completion_tokens) == (12, 34), cut
    s = UsageScanner()
    s.feed(b'data: {"usage":{"prompt_tokens":5,"completion_tokens":6}}\n\n')
    assert (s.prompt_tokens, s.completion_tokens) == (5, 6)
