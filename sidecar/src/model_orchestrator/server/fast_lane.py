"""The fast lane: plain GETs of the cached status routes answered before aiohttp's request machinery, on the same
socket.

It owns one decision, "may this request be answered here", and the head bytes of those answers; no rule. The app
hands it a `Table` (api.create_app, app key TABLE): the answers it may send (status_cache.py), the app's guard
(`api.request_guard`, as `api.guard_middleware` applies it) and the request metrics (`api.count_request`). It imports
nothing of the app.

A request is answered here only when it is complete and exactly `GET <a path of the table> HTTP/1.1` (no query), with
one Host, without a body or anything that changes how it is answered (Connection other than keep-alive, Upgrade,
Expect, Content-Length, Transfer-Encoding, a repeated Host/Origin/Authorization, a folded or malformed line), and the
guard lets it pass. At the first request that is not, the connection is handed to aiohttp's RequestHandler for good,
with every byte not yet answered (answers keep the order of the requests). An answer is the bytes aiohttp sends for
the same state (tests/test_fast_lane.py compares them): status line, Content-Type, Content-Length, Date, Server, body.

Back-pressure and idleness as aiohttp's: nothing is answered while the transport's writing is paused; at most
READ_LIMIT unanswered bytes are buffered (then reading pauses); a connection without progress (a request taken up,
an answer written, a write drained) for keepalive_timeout is closed, and idle ones are closed at shutdown.
`Runner` is aiohttp's AppRunner whose sites accept into the fast lane; `run_app` is `web.run_app` with that runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time  # the Date value aiohttp's own answers carry
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.tcp_helpers import tcp_keepalive, tcp_nodelay

from .status_cache import StatusCache

# Heads beyond these go to aiohttp, whose limits decide (its defaults: 8190-byte lines and fields, 128 headers)
MAX_HEAD = 8190
MAX_LINES = 64
READ_LIMIT = 1 << 16  # unanswered bytes buffered per connection before reading pauses (aiohttp's read_bufsize)
ANSWER_BATCH = 1 << 16  # answers to pipelined requests are written in batches of about this many bytes
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a header name (RFC 9110 token)
_VALUE = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")  # a header value without control characters
_JUDGED = {b"host": 0, b"origin": 1, b"authorization": 2}  # what the guard reads
_HANDS_OFF = {b"upgrade", b"expect", b"content-length", b"transfer-encoding"}  # a body or another protocol


@dataclass(frozen=True)
class Table:
    """What the app hands the fast lane: the answers it may send itself, and the app's rules for them."""

    answers: StatusCache  # the paths it may answer and their bodies
    guard: Callable[[str, str | None, str | None, str | None], Exception | None]  # path, Host, Origin, Authorization
    count: Callable[[str, str, int, float], None]  # the request metrics: route, method, status, seconds


TABLE = web.AppKey("fast_lane", Table)


def reset_connection(transport) -> None:
    """Drop a connection at once with what is buffered for it (a client that reads nothing would hold it: close()
    waits for the buffer to drain, and the kernel goes on offering its send queue to a closed window)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, not a FIN
    transport.abort()


def parse(head: bytes, paths: dict[bytes, str]) -> tuple[str, str, str | None, str | None] | None:
    """(path, Host, Origin, Authorization) of a request head (without its final CRLF CRLF) that the fast lane may
    answer, else None. Values are decoded as aiohttp decodes them (UTF-8, surrogateescape; outer blanks stripped)."""
    lines = head.split(b"\r\n")
    if len(lines) > MAX_LINES:
        return None
    first = lines[0]
    if not (first.startswith(b"GET ") and first.endswith(b" HTTP/1.1")):
        return None
    path = paths.get(first[4:-9])
    if path is None:
        return None
    judged: list[str | None] = [None, None, None]
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):
            return None
        name = name.lower()
        value = value.strip(b" \t")
        i = _JUDGED.get(name)
        if i is not None:
            if judged[i] is not None:
                return None
            judged[i] = value.decode("utf-8", "surrogateescape")
        elif name == b"connection":
            if value.lower() != b"keep-alive":
                return None
        elif name in _HANDS_OFF:
            return None
    host, origin, authorization = judged
    if host is None:  # aiohttp refuses an HTTP/1.1 request without Host (400)
        return None
    return path, host, origin, authorization


class Lane:
    """What every fast-lane connection of one server shares; calling it makes a connection's protocol."""

    def __init__(self, app: web.Application, server: web.Server, keepalive_timeout: float):
        self.server = server  # aiohttp's: makes the RequestHandler a connection is handed to
        table = app[TABLE]
        self.guard, self.cache, self.count = table.guard, table.answers, table.count
        self.keepalive_timeout = keepalive_timeout
        self.paths = {p.encode(): p for p in self.cache.paths}
        self.live: set[_Connection] = set()
        self.answered = 0  # requests answered here (tests read it)
        self._answers: dict[str, tuple[bytes, str, bytes]] = {}  # path -> (body, date, the whole answer)

    def __call__(self) -> _Connection:
        return _Connection(self)

    def answer(self, path: str, body: bytes) -> bytes:
        """The bytes aiohttp sends for `web.Response(body=body, content_type="application/json")` (kept per body and
        Date second)."""
        date = rfc822_formatted_time()
        last = self._answers.get(path)
        if last is not None and last[0] is body and last[1] == date:
            return last[2]
        whole = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                 f"Date: {date}\r\nServer: {SERVER_SOFTWARE}\r\n\r\n").encode() + body
        self._answers[path] = (body, date, whole)
        return whole

    def build(self, path: str) -> asyncio.Future:
        return asyncio.ensure_future(self.cache.get(path))

    def close(self) -> None:
        for conn in list(self.live):
            conn.close()


class _Connection(asyncio.Protocol):
    def __init__(self, lane: Lane):
        self.lane = lane
        self.transport: Any = None
        self.buf = bytearray()  # bytes received and not answered yet start at `pos`
        self.pos = 0
        self.building: asyncio.Future | None = None  # the build of an answer this connection waits for
        self.write_paused = False
        self.read_paused = False  # by us: READ_LIMIT unanswered bytes are buffered
        self.last = 0.0  # loop time of the last progress (connection, request taken up, answer written, drained)
        self.timer: asyncio.TimerHandle | None = None

    # ---- asyncio.Protocol ------------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        tcp_nodelay(transport, True)  # the socket options aiohttp's protocol sets on its connections
        tcp_keepalive(transport)
        self.transport = transport
        self.lane.live.add(self)
        self.last = asyncio.get_running_loop().time()
        self._arm()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.building is None and not self.write_paused:
            self._serve()
        else:
            self._limit_reading()

    def connection_lost(self, exc) -> None:
        self.lane.live.discard(self)
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()

    def pause_writing(self) -> None:  # the client does not read our answers: answer nothing more until it does
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.last = asyncio.get_running_loop().time()
        if self.building is None and self.transport is not None:
            self._serve()

    # ---- the lane ----------------------------------------------------------------------------------------------
    def _serve(self, built: bytes | None = None) -> None:
        """Answer the complete requests at the start of the buffer while the transport takes writes; hand over at
        the first one not for us."""
        lane, buf, pos, out, size = self.lane, self.buf, self.pos, [], 0
        t0 = time.perf_counter()
        while not self.write_paused:
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:  # too long, or bare LF endings
                if len(buf) - pos > MAX_HEAD or buf.count(b"\n", pos) != buf.count(b"\r\n", pos):
                    return self._hand_over(out, pos)
                break
            request = parse(bytes(buf[pos:end]), lane.paths) if end - pos <= MAX_HEAD else None
            if request is None or lane.guard(*request) is not None:
                return self._hand_over(out, pos)
            self.last = asyncio.get_running_loop().time()  # a request taken up
            path = request[0]
            body = built if built is not None else lane.cache.peek(path)
            built = None
            if body is None:  # not built for this state yet: answer when it is, then go on
                self.building = lane.build(path)
                self.building.add_done_callback(self._built)
                break
            answer = lane.answer(path, body)
            out.append(answer)
            size += len(answer)
            pos = end + 4
            lane.answered += 1
            lane.count(path, "GET", 200, time.perf_counter() - t0)
            if size >= ANSWER_BATCH:  # may pause writing: the loop then stops answering
                self._write(out)
                out, size = [], 0
        if pos:
            del buf[:pos]  # one move per turn, not one per request
            self.pos = 0
        if out:
            self._write(out)
        self._limit_reading()

    def _write(self, out: list[bytes]) -> None:
        self.transport.write(b"".join(out) if len(out) > 1 else out[0])
        self.last = asyncio.get_running_loop().time()

    def _limit_reading(self) -> None:
        """Pause reading while READ_LIMIT unanswered bytes wait (a build, a client that does not read), resume below."""
        if self.transport is None:
            return
        over = len(self.buf) - self.pos >= READ_LIMIT
        if over != self.read_paused:
            self.read_paused = over
            (self.transport.pause_reading if over else self.transport.resume_reading)()

    def _built(self, fut: asyncio.Future) -> None:
        self.building = None
        failed = fut.cancelled() or fut.exception() is not None
        if self.transport is None:  # the client left meanwhile
            return
        if failed:  # aiohttp answers the request (and maps the error)
            return self._hand_over([], self.pos)
        self._serve(fut.result())

    def _hand_over(self, out: list[bytes], pos: int) -> None:
        """From now on aiohttp's RequestHandler owns the connection; it gets every byte not yet answered."""
        transport, lane = self.transport, self.lane
        if out:
            transport.write(b"".join(out))
        rest = bytes(self.buf[pos:])
        lane.live.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        self.transport, self.buf, self.pos = None, bytearray(), 0
        handler = lane.server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self.read_paused:  # aiohttp applies its own limits to what it is given
            transport.resume_reading()
        if self.write_paused:  # the handler waits on drain until the transport resumes writing
            handler.pause_writing()
        if rest:
            handler.data_received(rest)

    def _arm(self) -> None:
        if self.lane.keepalive_timeout > 0:
            self.timer = asyncio.get_running_loop().call_at(self.last + self.lane.keepalive_timeout, self._idle)

    def _idle(self) -> None:
        self.timer = None
        if self.transport is None:
            return
        if asyncio.get_running_loop().time() < self.last + self.lane.keepalive_timeout:
            return self._arm()
        self.close()

    def close(self) -> None:
        if self.write_paused or self.transport.get_write_buffer_size():
            reset_connection(self.transport)  # close() would wait for a client that does not read
        else:
            self.transport.close()


class MalformedRequests(logging.Filter):
    """aiohttp logs every request it cannot parse at ERROR with a traceback (RequestHandler.handle_error), so any
    local client could flood the log. Those (an HttpProcessingError: answered 400 already) become one WARNING line
    per `every_s` saying how many there were and the last one's reason; every other record passes unchanged."""

    def __init__(self, every_s: float = 60.0):
        super().__init__()
        self.every_s = every_s
        self.count = 0
        self.next_at = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        self.count += 1
        now = time.monotonic()
        if now < self.next_at:
            return False
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.msg = "%d malformed HTTP request(s) answered %d since the last such line; the last from %s: %s"
        reason = " ".join(str(exc.message or type(exc).__name__).split())[:200]  # aiohttp's spans lines
        record.args = (self.count, exc.code or 400, remote, reason)
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        self.count, self.next_at = 0, now + self.every_s
        return True


SERVER_LOG = logging.getLogger("model_orchestrator.http")  # what aiohttp's request handlers log to
SERVER_LOG.addFilter(MalformedRequests())


class Runner(web.AppRunner):
    """aiohttp's AppRunner whose sites accept connections into the fast lane (`lane`); `aiohttp_server` is the
    plain aiohttp server behind it (tests serve it on a second socket to compare answers). Its request handlers log
    to SERVER_LOG (malformed requests rate-limited, without tracebacks)."""

    def __init__(self, app: web.Application, **kwargs: Any):
        kwargs.setdefault("logger", SERVER_LOG)
        super().__init__(app, **kwargs)
        self._keepalive_timeout = kwargs.get("keepalive_timeout", 3630.0)  # RequestHandler's default when unset
        self.lane: Lane | None = None

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        self.lane = Lane(self.app, server, self._keepalive_timeout)
        return server

    @property
    def server(self) -> Callable[[], asyncio.Protocol] | None:  # what the sites accept with
        return self.lane if self._server is not None else None

    @property
    def aiohttp_server(self) -> web.Server | None:
        return self._server

    async def shutdown(self) -> None:
        if self.lane is not None:
            self.lane.close()  # the idle ones, as aiohttp's pre_shutdown has just closed its idle connections
        await super().shutdown()


def run_app(app: web.Application, *, host: str, port: int, print: Callable[[str], None] | None = None,
            **kwargs: Any) -> None:
    """`web.run_app(app, host=, port=, ...)` with the fast lane: the same signals (SIGINT/SIGTERM end it
    gracefully), the same shutdown of the runner, then of every task left."""
    async def main() -> None:
        runner = Runner(app, handle_signals=True, **kwargs)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            if print is not None:
                print(f"======== Running on {site.name} ========")
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    loop = asyncio.new_event_loop()
    main_task = loop.create_task(main())
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main_task)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main_task.done():
                main_task.cancel()
                try:
                    loop.run_until_complete(main_task)
                except asyncio.CancelledError:
                    pass
        finally:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
