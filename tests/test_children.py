"""Issue 20, findings 1 and 3: the llama-server children are reachable by the sidecar only, and never fetch a URL.

Each test runs a real llama-server under an in-process sidecar and then acts as the attacker would: a local process
or a web page looking for the child (no TCP port, a socket in a directory only this user may enter, a key of its
own per launch, no CORS grant), slot files with crafted names, and media URLs under every key llama-server reads
one from, on every proxied route (a loopback web server counts who fetched what).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import pytest
from aiohttp import web

from support.helpers import CHAT, child_call, child_endpoint, tcp_listening
from support.registry import model, write_registry

EVIL = "https://evil.example"


async def _client(aiohttp_client, orch):
    from model_orchestrator.server.api import create_app

    c = await aiohttp_client(create_app(orch))
    c.orch = orch
    return c


async def _loaded_pid(client, model: str = "tiny") -> int:
    r = await client.post("/models/load", json={"model": model})
    body = await r.json()
    assert r.status == 200, body
    return body["pid"]


def _call(pid: int, *args, **kwargs):
    return asyncio.to_thread(child_call, pid, *args, **kwargs)


# ---- finding 1: a child is reachable only through the sidecar ---------------------------------------------------
async def test_a_child_has_no_tcp_port_and_refuses_callers_without_its_key(client):
    """The finding: a child listened on a loopback port with no key; a web page in Chromium found it by a port scan
    and chatted with the model, and any local process could do the same."""
    pid = await _loaded_pid(client)
    assert tcp_listening(pid) == []  # nothing to scan for
    status = await (await client.get("/models/status")).json()
    assert status["loaded_models"]["tiny"]["pid"] == pid and status["loaded_models"]["tiny"]["port"] is None
    sock, key = child_endpoint(pid)
    sock = Path(sock)
    assert sock.is_socket() and sock.parent == client.orch.settings.state_dir / "sockets"
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700  # other users cannot even reach the socket
    assert key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()  # argv is world-readable; the key is not in it
    for method, path, body in (("GET", "/v1/models", None), ("GET", "/slots", None), ("GET", "/props", None),
                               ("POST", "/v1/chat/completions", CHAT), ("POST", "/slots/0?action=save",
                                                                         {"filename": "x.bin"}),
                               ("POST", "/lora-adapters", [])):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer " + key[:-1]}):
            status, answer, _ = await _call(pid, method, path, body, key=False, headers=headers)
            assert status == 401, (method, path, headers, status, answer)
    status, answer, _ = await _call(pid, "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 4})
    assert status == 200, answer  # the key is what the sidecar sends
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": "tiny"})
    assert r.status == 200  # ... through LlamaServer.request
    assert not list((client.orch.settings.state_dir / "slots").rglob("x.bin"))


async def test_a_web_page_gets_no_cors_grant_from_a_child(client):
    """The finding: a child reflected any Origin with credentials, so a page could read its answers cross-origin."""
    pid = await _loaded_pid(client)
    for origin in (EVIL, "null", "http://127.0.0.1:8000", "http://localhost"):
        for method, path, body, extra in (("GET", "/v1/models", None, {}), ("GET", "/health", None, {}),
                                          ("POST", "/v1/chat/completions", {**CHAT, "max_tokens": 2}, {}),
                                          ("OPTIONS", "/v1/chat/completions", None,
                                           {"Access-Control-Request-Method": "POST",
                                            "Access-Control-Request-Headers": "authorization, content-type"})):
            status, _, headers = await _call(pid, method, path, body, headers={"Origin": origin, **extra})
            allow = headers.get("Access-Control-Allow-Origin")
            assert allow not in (origin, "*") and headers.get("Access-Control-Allow-Credentials") != "true", \
                (origin, method, path, headers)


async def test_slot_files_stay_in_the_slot_dir_and_count_against_the_cap(aiohttp_client, make_orchestrator):
    """The finding: `POST /slots/0?action=save` wrote `written-by-a-web-page.bin` into the state dir, and files not
    named slot-*.bin escaped the slot cache's cap (the disk could be filled). With the key, as the sidecar's own
    user: a crafted name cannot leave the slot directory, and whatever is written there counts and is removed."""
    c = await _client(aiohttp_client, make_orchestrator(slot_cache_mb=0.5))
    pid = await _loaded_pid(c)
    r = await c.post("/v1/chat/completions", json={**CHAT, "model": "tiny", "max_tokens": 8})
    assert r.status == 200
    state = c.orch.settings.state_dir
    slot_dir = c.orch.slot_cache.dir_for("tiny")
    before = {p for p in state.parent.rglob("*")}
    for name in ("../escape.bin", "../../escape.bin", str(state / "escape.bin"), "sub/escape.bin", "..", ".",
                 "..\\escape.bin", "a\u2215b.bin", " escape.bin", "escape.bin."):
        status, answer, _ = await _call(pid, "POST", "/slots/0?action=save", {"filename": name})
        assert status == 400 and "Invalid filename" in json.dumps(answer), (name, status, answer)
    assert {p for p in state.parent.rglob("*")} == before
    status, answer, _ = await _call(pid, "POST", "/slots/0?action=save", {"filename": "written-by-a-web-page.bin"})
    assert status == 200 and answer["n_written"] > 0, answer
    page_file = slot_dir / "written-by-a-web-page.bin"
    assert page_file.exists() and c.orch.slot_cache.disk_bytes() >= page_file.stat().st_size
    big = slot_dir / "filler.bin"  # as if written the same way, bigger than the cap
    big.write_bytes(b"\0" * (1 << 20))
    c.orch.slot_cache.enforce_cap()
    assert not big.exists() and c.orch.slot_cache.disk_bytes() <= c.orch.slot_cache.cap_bytes
    r = await c.post("/models/unload", json={"model": "tiny"})  # saves slot-0.bin, then enforces the cap
    assert r.status == 200
    left = sorted(p.name for p in c.orch.slot_cache.stored())
    assert sum(p.stat().st_size for p in c.orch.slot_cache.stored()) <= c.orch.slot_cache.cap_bytes, left
    assert c.orch.slot_cache.drop("tiny", "test") == len(left) and c.orch.slot_cache.stored() == []


def test_the_slot_caches_cap_counts_every_file_in_the_slot_dirs(tmp_path):
    """Files not named slot-*.bin used to escape the cap and the metric: anything in a slot dir counts now."""
    from model_orchestrator.core.slot_cache import MANIFEST, SlotCache

    cache = SlotCache(tmp_path / "slots", cap_mb=1)
    d = cache.dir_for("m")
    d.mkdir(parents=True)
    (d / MANIFEST).write_text("{}")
    (d / "slot-0.bin").write_bytes(b"\0" * (512 << 10))
    page = d / "written-by-a-web-page.bin"
    page.write_bytes(b"\0" * (2 << 20))
    os.utime(page, (1, 1))  # the oldest: the cap removes it first
    assert cache.disk_bytes() == (512 << 10) + (2 << 20)
    cache.enforce_cap()
    assert not page.exists() and (d / "slot-0.bin").exists() and cache.disk_bytes() == 512 << 10
    (d / "other.bin").write_bytes(b"x")
    assert cache.drop("m", "failed") == 2 and sorted(p.name for p in d.iterdir()) == [MANIFEST]


async def test_an_operators_llama_api_key_neither_breaks_nor_opens_the_children(aiohttp_client, make_orchestrator,
                                                                                 monkeypatch):
    """llama-server reads LLAMA_API_KEY from its environment: the sidecar's own environment must not choose the
    children's key (it used to be inherited: every proxied request then got 401 from llama-server)."""
    monkeypatch.setenv("LLAMA_API_KEY", "operators-key")
    monkeypatch.setenv("LLAMA_ARG_HOST", "0.0.0.0")
    c = await _client(aiohttp_client, make_orchestrator())
    pid = await _loaded_pid(c)
    r = await c.post("/v1/chat/completions", json={**CHAT, "model": "tiny"})
    assert r.status == 200, await r.text()
    assert child_endpoint(pid)[1] != "operators-key" and tcp_listening(pid) == []
    status, _, _ = await _call(pid, "GET", "/v1/models", key=False, headers={"Authorization": "Bearer operators-key"})
    assert status == 401


def test_api_key_and_host_flags_are_reserved_and_the_refusal_says_why(tmp_path):
    from model_orchestrator.files.registry import RegistryError, load_registry

    for flag in (["--api-key", "k"], ["--api-key-file=/k"], ["--host", "0.0.0.0"], ["--port", "8080"],
                 ["--cors-origins", "*"], ["--cors-credentials"]):
        with pytest.raises(RegistryError) as exc:
            load_registry(write_registry(tmp_path / "models.toml", model("m", extra_args=flag)))
        text = str(exc.value)
        assert flag[0].split("=")[0] in text and "private Unix socket" in text, text
        assert "MODEL_ORCHESTRATOR_API_KEY" in text, text


async def test_a_state_dir_too_long_for_a_socket_address_uses_a_private_temporary_directory(
        aiohttp_client, make_orchestrator, tmp_path):
    long_state = tmp_path / ("d" * 60) / ("e" * 60) / "state"
    orch = make_orchestrator()
    orch.settings.state_dir = long_state
    from model_orchestrator.core.lifecycle import ChildSockets

    orch.sockets = ChildSockets(long_state)
    c = await _client(aiohttp_client, orch)
    pid = await _loaded_pid(c)
    sock = Path(child_endpoint(pid)[0])
    assert len(os.fsencode(sock)) <= 107 and not str(sock).startswith(str(long_state))
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    r = await c.post("/v1/chat/completions", json={**CHAT, "model": "tiny"})
    assert r.status == 200
    await c.close()
    assert not sock.parent.exists()  # removed with the sidecar


# ---- finding 3: no media URL reaches llama-server -----------------------------------------------------------------
PNG_B64 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==")


@pytest.fixture
async def media_host(aiohttp_server):
    """A loopback web server that records every fetch (whoever makes it) and serves a PNG."""
    hits = []

    async def anything(request):
        hits.append((request.path, request.headers.get("User-Agent", "")))
        import base64
        return web.Response(body=base64.b64decode(PNG_B64), content_type="image/png")

    app = web.Application()
    app.router.add_get("/{tail:.*}", anything)
    server = await aiohttp_server(app)
    server.hits = hits
    return server


@pytest.fixture
def vision_embed_orchestrator(tmp_path, model_dir, llama_server_bin):
    """A model with a vision projector that also serves embeddings (llama-server reads images in both)."""
    from model_orchestrator.platform.gpu import NoGpuView
    from model_orchestrator.core.orchestrator import Orchestrator
    from model_orchestrator.files.registry import load_registry
    from model_orchestrator.platform.settings import Settings

    reg = write_registry(tmp_path / "vision.toml", model("eyes", path=model_dir / "hello.gguf",
                                                         mmproj=model_dir / "mmproj.gguf", context_size=512,
                                                         extra_args=["--embeddings", "--pooling", "mean"]))

    def make(**settings):
        return Orchestrator(Settings(state_dir=tmp_path / "state", stop_timeout_s=3, load_timeout_s=30, **settings),
                            load_registry(reg), NoGpuView("tests run without a GPU"), llama_server_bin)

    return make


def _media_bodies(url: str) -> list[tuple[str, dict]]:
    """Every place llama-server b11434 reads a media reference from, on every proxied route."""
    def chat(part: dict, role: str = "user") -> dict:
        return {"model": "eyes", "max_tokens": 2, "messages": [{"role": role, "content": [
            {"type": "text", "text": "what is this?"}, part]}]}

    parts = [{"type": "image_url", "image_url": {"url": url}},
             {"type": "image_url", "image_url": {"url": url.upper().replace("HTTP://", "http://", 0)}},
             {"type": "input_video", "input_video": {"data": url}},
             {"type": "input_video", "input_video": {"url": url}},
             {"type": "video_url", "video_url": {"data": url}},
             {"type": "video_url", "video_url": {"url": url}},
             {"type": "input_audio", "input_audio": {"data": url, "format": "wav"}},
             {"type": "input_audio", "input_audio": {"url": url, "format": "wav"}},
             {"type": "image_url", "image_url": url}]
    bodies = [(f"/v1/chat/completions {p['type']} {sorted(p[p['type']]) if isinstance(p[p['type']], dict) else 'str'}",
               chat(p)) for p in parts]
    bodies.append(("/v1/chat/completions in a tool message", chat(parts[0], role="tool")))
    bodies += [(f"/v1/embeddings input {p['type']}", {"model": "eyes", "input": [{"content": [p]}]}) for p in parts[:3]]
    bodies.append(("/v1/completions prompt", {"model": "eyes", "max_tokens": 2,
                                              "prompt": [{"content": [parts[0]]}]}))
    return bodies


async def test_no_media_url_reaches_llama_server_by_any_key_or_route(aiohttp_client, vision_embed_orchestrator,
                                                                      media_host):
    """The finding: llama-server fetched URLs given as input_video.data, video_url.data, or image_url inside
    /v1/embeddings input; only `url` keys on chat were checked."""
    c = await _client(aiohttp_client, vision_embed_orchestrator())
    await _loaded_pid(c, "eyes")
    url = str(media_host.make_url("/probe.png"))
    for what, body in _media_bodies(url):
        path = what.split()[0]
        raw = json.dumps(body)
        for variant in (raw, raw.replace('"image_url"', '"\\u0069mage_url"')):  # a JSON escape hides no key
            r = await c.post(path, data=variant, headers={"Content-Type": "application/json"})
            answer = await r.json()
            assert r.status == 400 and answer["error"]["code"] == "image_url_not_allowed", (what, r.status, answer)
    await asyncio.sleep(0.5)  # a fetch llama-server started would have arrived
    assert media_host.hits == [], media_host.hits
    r = await c.post("/v1/chat/completions", json={"model": "eyes", "max_tokens": 2, "messages": [{
        "role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}}]}]})
    assert r.status == 200, await r.text()  # data URLs pass as before


async def test_allowed_media_urls_are_fetched_by_the_sidecar_and_failures_tell_nothing_of_ports(
        aiohttp_client, vision_embed_orchestrator, media_host, unused_tcp_port_factory):
    """Allowed hosts' URLs are fetched by the sidecar, whatever the key or route; a fetch that fails answers the same
    whether the port is closed or open (the finding: llama-server's error text told them apart, a port scanner)."""
    c = await _client(aiohttp_client, vision_embed_orchestrator(image_url_hosts=media_host.host))
    url = str(media_host.make_url("/ok.png"))
    r = await c.post("/v1/chat/completions", json={"model": "eyes", "max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
    assert r.status == 200, await r.text()
    r = await c.post("/v1/chat/completions", json={"model": "eyes", "max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "video_url", "video_url": {"data": url}}]}]})
    assert r.status in (200, 400), await r.text()  # llama-server got a data URL (whether it reads video or not)
    # each URL fetched once, by the sidecar (llama-server got data URLs)
    assert [p for p, _ in media_host.hits] == ["/ok.png"] * 2 and all("aiohttp" in ua for _, ua in media_host.hits)

    port = unused_tcp_port_factory()
    probe = {"model": "eyes", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "input_video", "input_video": {"data": f"http://{media_host.host}:{port}/x.png"}}]}]}
    r = await c.post("/v1/chat/completions", json=probe)
    closed = (r.status, await r.json())

    async def missing(request):
        return web.Response(status=404, text="no such thing")

    app = web.Application()
    app.router.add_get("/x.png", missing)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, media_host.host, port).start()
    try:
        r = await c.post("/v1/chat/completions", json=probe)
        open_ = (r.status, await r.json())
    finally:
        await runner.cleanup()
    assert closed == open_ and closed[0] == 400 and closed[1]["error"]["code"] == "image_fetch_failed", (closed, open_)


async def test_one_request_may_carry_a_bounded_number_of_remote_media_urls(aiohttp_client, vision_embed_orchestrator,
                                                                            media_host):
    """Each allowed URL is fetched whole into memory: a body of thousands of them must not be fetched at all."""
    from model_orchestrator.server.media_urls import MAX_REMOTE

    c = await _client(aiohttp_client, vision_embed_orchestrator(image_url_hosts=media_host.host))
    url = str(media_host.make_url("/many.png"))
    parts = [{"type": "image_url", "image_url": {"url": f"{url}?{i}"}} for i in range(MAX_REMOTE + 1)]
    r = await c.post("/v1/chat/completions", json={"model": "eyes", "messages": [{"role": "user", "content": parts}]})
    body = await r.json()
    assert r.status == 400 and body["error"]["code"] == "invalid_request", body
    assert str(MAX_REMOTE) in body["error"]["message"]
    assert media_host.hits == [] and c.orch.models["eyes"].state.value == "unloaded"
