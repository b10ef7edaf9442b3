"""The queue in front of every model, through the HTTP API with a real llama-server: what a caller sees (the wait
header, its own bound, the 503 that says what it waited for), what leaves the queue when a caller hangs up, the
events, and the next model's file read into the page cache while its victim drains."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time

import pytest

from support.helpers import read_events

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@pytest.fixture
async def capped(aiohttp_client, make_orchestrator):
    from model_orchestrator.server.api import create_app

    orch = make_orchestrator(max_loaded=1)
    c = await aiohttp_client(create_app(orch))
    c.orch = orch
    yield c


async def _queued(c, model: str, length: int = 1) -> dict:
    for _ in range(200):
        q = (await (await c.get("/models/status")).json())["queues"].get(model)
        if q and q["length"] >= length:
            return q
        await asyncio.sleep(0.02)
    raise AssertionError(f"nothing queued for {model}")


async def test_every_answer_says_how_long_it_waited(capped):
    c = capped
    r = await c.post("/v1/chat/completions", json={**CHAT, "model": "tiny"})  # a load on demand: it waited
    assert r.status == 200 and int(r.headers["X-Queue-Wait-Ms"]) > 0, r.headers
    r = await c.post("/v1/chat/completions", json={**CHAT, "model": "tiny"})  # loaded, nobody waits: at once
    assert r.status == 200 and int(r.headers["X-Queue-Wait-Ms"]) < 50
    r = await c.post("/v1/chat/completions", json={**CHAT, "model": "tiny", "stream": True})
    assert r.status == 200 and "X-Queue-Wait-Ms" in r.headers
    await r.read()


@pytest.mark.parametrize("value", ["0", "0.5", "-1", "nan", "inf", "86401", "soon"])
async def test_a_bad_queue_timeout_header_is_400_and_changes_nothing(capped, value):
    c = capped
    r = await c.post("/v1/chat/completions", json={**CHAT, "model": "tiny"}, headers={"X-Queue-Timeout-S": value})
    body = await r.json()
    assert r.status == 400 and body["error"]["code"] == "invalid_request", body
    assert "X-Queue-Timeout-S" in body["error"]["message"]
    assert c.orch.models["tiny"].state.value == "unloaded"  # nothing was loaded for it


async def test_a_request_that_waits_past_its_bound_gets_503_with_what_it_waited_for(capped):
    c = capped
    tiny = c.orch.models["tiny"]
    await c.post("/models/load", json={"model": "tiny"})
    tiny.acquire()  # busy for as long as the test likes: tiny-tools cannot get the only place
    try:
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "tiny-tools"},
                         headers={"X-Queue-Timeout-S": "1"})
        body = await r.json()
        err = body["error"]
        assert r.status == 503 and err["code"] == "queue_timeout", body
        assert 1 <= err["waited_s"] < 3 and "tiny" in err["waiting_for"], err
        assert int(r.headers["Retry-After"]) >= 1
        assert tiny.state.value == "loaded", "a busy model was evicted"
    finally:
        tiny.release()
    status = await (await c.get("/models/status")).json()
    assert "tiny-tools" not in status["queues"]  # it left the queue
    metrics = await (await c.get("/metrics")).text()
    assert 'model_orchestrator_queue_refusals_total{code="queue_timeout",model="tiny-tools"} 1.0' in metrics


async def test_a_caller_that_hangs_up_while_queued_leaves_the_queue(capped):
    c = capped
    tiny = c.orch.models["tiny"]
    await c.post("/models/load", json={"model": "tiny"})
    tiny.acquire()
    try:
        waiting = asyncio.create_task(c.post("/v1/chat/completions", json={**CHAT, "model": "tiny-tools"}))
        await _queued(c, "tiny-tools")
        waiting.cancel()  # the client closes its connection
        await asyncio.gather(waiting, return_exceptions=True)
        for _ in range(100):  # noticed within the queue's poll (0.5 s)
            if "tiny-tools" not in (await (await c.get("/models/status")).json())["queues"]:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the hung-up request stayed in the queue")
    finally:
        tiny.release()
    await asyncio.sleep(0.3)
    assert c.orch.models["tiny-tools"].state.value == "unloaded", "a load started for a caller who left"
    assert tiny.in_flight == 0 and tiny.state.value == "loaded"


async def test_queued_granted_and_expired_are_events(capped):
    c = capped
    resp = await c.get("/models/events?types=queued,granted,expired")
    tiny = c.orch.models["tiny"]
    await c.post("/models/load", json={"model": "tiny"})
    tiny.acquire()
    expired = await c.post("/v1/chat/completions", json={**CHAT, "model": "tiny-tools"},
                           headers={"X-Queue-Timeout-S": "1"})
    assert expired.status == 503
    waiting = asyncio.create_task(c.post("/v1/chat/completions", json={**CHAT, "model": "tiny-tools"}))
    await _queued(c, "tiny-tools")
    tiny.release()  # drained: tiny-tools swaps in and the request is granted
    assert (await asyncio.wait_for(waiting, 60)).status == 200
    events = await read_events(resp, lambda ev: sum(e["_event"] == "granted" for e in ev) >= 1)
    resp.close()
    kinds = [(e["_event"], e["model"]) for e in events]
    assert kinds[:2] == [("queued", "tiny-tools"), ("expired", "tiny-tools")], kinds
    assert ("queued", "tiny-tools") in kinds[2:] and kinds[-1] == ("granted", "tiny-tools"), kinds
    expired_event = next(e for e in events if e["_event"] == "expired")
    assert expired_event["waited_s"] >= 1 and expired_event["waiting_for"]
    assert events[-1]["waited_s"] > 0


@pytest.mark.skipif(shutil.which("fincore") is None, reason="util-linux's fincore reports page-cache residency")
def test_the_next_models_file_is_read_into_the_page_cache_once(tmp_path):
    """What the dispatcher does while a victim drains (scheduler.plan's `prefetch`): the parts of the file that are
    not cached are read (fincore, not our own mincore, says they are cached after); a cached file is not read again
    (a copy of gigabytes would compete with the loads under way for memory bandwidth)."""
    from model_orchestrator.platform.page_cache import missing_ranges, read_into_cache

    mib = 1 << 20
    path = tmp_path / "next.gguf"
    path.write_bytes(os.urandom(16 * mib))
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)

    def drop(offset: int = 0, length: int = 0) -> None:  # out of the page cache (clean pages go at once)
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)

    def cached() -> int:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[0])

    try:
        drop()
        before = cached()
        assert before < 4 * mib and sum(n for _, n in missing_ranges(path)) >= 12 * mib, before
        assert read_into_cache([path]) >= 12 * mib
        assert cached() >= 15 * mib and missing_ranges(path) == [], cached()
        assert read_into_cache([path]) == 0  # all cached: nothing is read

        drop(4 * mib, 2 * mib)  # a hole in the middle: only the hole is missing, and only it is read
        assert missing_ranges(path) == [(4 * mib, 2 * mib)]
        assert read_into_cache([path]) == 2 * mib and cached() >= 15 * mib
        drop()
        assert read_into_cache([path], budget=8 * mib) == 0  # a file that does not fit the budget is not read
        fifo = tmp_path / "fifo.gguf"  # a hostile model path: opening it for reading would block the thread
        os.mkfifo(fifo)
        assert missing_ranges(fifo) == [] and read_into_cache([fifo]) == 0
    finally:
        os.close(fd)
