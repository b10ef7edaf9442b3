"""The fast lane (fast_lane.py): plain GETs of the status routes answered before aiohttp must be byte for byte what
aiohttp answers for the same state, and everything else must reach aiohttp unchanged and in order.

Each exchange is sent twice, the same bytes in the same packets: to the sidecar's socket (fast lane first) and to
aiohttp's own server of the same app on a second socket; the answers are compared with only Date masked. Every
exchange ends with a request aiohttp answers with `Connection: close`, so reading to the end is deterministic.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from support.helpers import metric_value

CLOSE = b"GET /health?end HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def get(path: str, *headers: str, host: str | None = "127.0.0.1") -> bytes:
    lines = [f"GET {path} HTTP/1.1"] + ([f"Host: {host}"] if host is not None else []) + list(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def exchange(port: int, chunks: list[bytes]) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.02)  # separate TCP segments: a head split across packets
        return re.sub(rb"Date: [^\r]*", b"Date: -", await asyncio.wait_for(reader.read(), 30))
    finally:
        writer.close()


@pytest.fixture
async def both(aiohttp_client, make_orchestrator):
    """start(**settings) -> (client, fast-lane port, aiohttp's port, the lane)."""
    from model_orchestrator.server.api import ORCH, create_app

    servers = []

    async def start(**settings):
        c = await aiohttp_client(create_app(make_orchestrator(**settings)))
        c.orch = c.app[ORCH]
        runner = c.server.runner
        plain = await asyncio.get_running_loop().create_server(runner.aiohttp_server, "127.0.0.1", 0)
        servers.append(plain)
        return c, c.server.port, plain.sockets[0].getsockname()[1], runner.lane

    yield start
    for s in servers:
        s.close()


EVIL = "Origin: https://evil.example"
# (name, chunks before CLOSE, how many requests the fast lane answers itself)
CASES = [
    ("status", [get("/models/status")], 1),
    ("three routes pipelined in one packet", [get("/models/status") + get("/models") + get("/health")], 3),
    ("keep-alive said aloud, other headers", [get("/models/status", "Connection: keep-alive", "Accept: */*",
                                                  "User-Agent: n8n")], 1),
    ("split across packets", [b"GET /models/sta", b"tus HTTP/1.1\r\nHo", b"st: 127.0.0.1\r\n", b"\r", b"\n"], 1),
    ("foreign origin: 403", [get("/models/status", EVIL)], 0),
    ("foreign host: 403", [get("/models/status", host="evil.example")], 0),
    ("own origin", [get("/models/status", "Origin: http://127.0.0.1")], 1),
    ("no host: 400", [get("/models/status", host=None)], 0),
    ("HEAD", [b"HEAD /models/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"], 0),
    ("query strings", [get("/models/status?x=1"), get("/models?types=")], 0),
    ("events with a bad query", [get("/models/events?types=bogus")], 0),
    ("HTTP/1.0", [b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"], 0),
    ("two Host headers", [get("/health", "Host: evil.example")], 0),
    ("a body announced", [get("/health", "Content-Length: 2") + b"{}"], 0),
    ("bare LF line endings", [b"GET /health HTTP/1.1\nHost: 127.0.0.1\n\n"], 0),
    ("a header beyond aiohttp's limit: 400", [get("/health", "X-Big: " + "a" * 9000)], 0),
    ("many headers", [get("/health", *[f"X-{i}: {i}" for i in range(200)])], 0),
    ("folded header line", [get("/health", "X-A: 1", " folded")], 0),
    ("not cached: the OpenAPI document, the docs page", [get("/openapi.json"), get("/docs")], 0),
    ("fast, then a POST, then what would be fast: aiohttp keeps the order",
     [get("/health") + b"POST /models/estimate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\n{x}"
      + get("/models/status")], 1),
]


@pytest.mark.parametrize("name,chunks,fast", CASES, ids=[c[0] for c in CASES])
async def test_fast_lane_answers_exactly_as_aiohttp(both, name, chunks, fast):
    c, port, plain_port, lane = await both()
    await c.get("/models/status")  # warm the cache: both sides read the same state
    before = lane.answered
    fast_answer = await exchange(port, chunks + [CLOSE])
    assert lane.answered - before == fast, f"{name}: the fast lane answered {lane.answered - before} requests"
    plain_answer = await exchange(plain_port, chunks + [CLOSE])
    assert lane.answered - before == fast  # aiohttp's own socket never goes through the lane
    assert fast_answer == plain_answer
    assert fast_answer.count(b"HTTP/1.") >= fast + 1  # the fast answers, then at least aiohttp's


async def test_with_an_api_key_the_same_answers_and_the_key_is_checked_by_the_same_guard(both):
    c, port, plain_port, lane = await both(api_key="k" * 24)
    await c.get("/models/status", headers={"Authorization": "Bearer " + "k" * 24})
    for headers, fast in (((), 0), (("Authorization: Bearer nope",), 0), (("Authorization: Bearer " + "k" * 24,), 1),
                          (("Authorization: Bearer " + "k" * 24, EVIL), 1)):
        before = lane.answered
        answers = [await exchange(p, [get("/models/status", *headers), get("/health")] + [CLOSE])
                   for p in (port, plain_port)]
        assert answers[0] == answers[1], headers
        # /health needs no key: the lane answers it unless a refusal before it handed the connection over
        assert lane.answered - before == (2 if fast else 0), headers
        assert (b"401 Unauthorized" in answers[0]) == (not fast), answers[0][:300]


async def test_fast_answers_follow_state_changes_and_are_counted_in_the_metrics(both):
    c, port, _, lane = await both()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def status() -> bytes:
        writer.write(get("/models/status"))
        head = await reader.readuntil(b"\r\n\r\n")
        return await reader.readexactly(int(re.search(rb"Content-Length: (\d+)", head)[1]))

    text = await (await c.get("/metrics")).text()
    counted = metric_value(text, "model_orchestrator_http_requests_total",
                           route="/models/status", method="GET", status="200") or 0
    before = lane.answered
    first = await status()
    c.orch.reservations.add("whisperx", 1000, ttl_s=60)
    second = await status()
    writer.close()
    assert b"whisperx" not in first and b"whisperx" in second
    assert lane.answered - before == 2
    text = await (await c.get("/metrics")).text()
    assert metric_value(text, "model_orchestrator_http_requests_total",
                        route="/models/status", method="GET", status="200") == counted + 2


async def test_an_idle_fast_lane_connection_is_closed_after_the_keepalive_timeout(aiohttp_client, make_orchestrator):
    from model_orchestrator.server.api import create_app

    c = await aiohttp_client(create_app(make_orchestrator()), server_kwargs={"keepalive_timeout": 0.3})
    lane = c.server.runner.lane
    for first in (b"", get("/health")):  # silent from the start, and idle after an answer
        reader, writer = await asyncio.open_connection("127.0.0.1", c.server.port)
        writer.write(first)
        data = await asyncio.wait_for(reader.read(), 20)  # EOF: the lane closed it
        assert data.count(b"200 OK") == (1 if first else 0)
        writer.close()
    assert not lane.live
