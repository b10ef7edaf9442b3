"""The OpenAI-compatible pass-through: a request is routed by its `model` to that model's llama-server.

It owns the bytes: bodies go upstream unchanged (but for a request's `lora`, completed by lora.request_scales, and
remote media URLs, which media_urls.localize replaces), SSE streams come back chunk by chunk, token counts are read
from the answers' usage. The body is parsed once (orjson); a structural check replaces pydantic, which runs only to
name a wrong field. The upstream comes from `Orchestrator.lease` (ready, counted in flight). Timeouts bound connecting
and the silence between reads, never a whole generation (504); a client that hangs up counts as 499; llama-server's
500 for a request it cannot take becomes a 400 with our own code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import aiohttp
import orjson
from aiohttp import web
from pydantic import ValidationError

from ..core import lora

from . import media_urls
from ..core.dispatcher import CallerGone
from ..platform.errors import Code, Refused
from .http_errors import STATUS, invalid_request, refusal_body
from ..files.llama_args import serves_embeddings
from ..core.orchestrator import LlamaServer, ManagedModel, Orchestrator
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, OpenAIModel, OpenAIModelList

_REQUESTS = {"chat_completions": ChatCompletionRequest, "completions": CompletionRequest,
             "embeddings": EmbeddingRequest}
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}


class UsageScanner:
    """Finds token counts in an SSE stream without delaying it: only lines that mention usage/timings are parsed."""

    def __init__(self) -> None:
        self._tail = b""
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def feed(self, chunk: bytes) -> None:
        # called for every chunk of every stream: two C-level searches, Python work only on the final event
        data = self._tail + chunk if self._tail else chunk
        complete, _, self._tail = data.rpartition(b"\n")
        if b'"usage"' not in complete and b'"timings"' not in complete:
            return
        for line in complete.split(b"\n"):
            if line.startswith(b"data: {") and (b'"usage"' in line or b'"timings"' in line):
                try:
                    self.read(json.loads(line[6:]))
                except ValueError:
                    pass

    def read(self, obj: dict) -> None:
        usage = obj.get("usage") or {}
        timings = obj.get("timings") or {}
        prompt = usage.get("prompt_tokens", timings.get("prompt_n"))
        completion = usage.get("completion_tokens", timings.get("predicted_n"))
        if isinstance(prompt, int):
            self.prompt_tokens = prompt
        if isinstance(completion, int):
            self.completion_tokens = completion


async def _upstream_lost(model: ManagedModel, server: LlamaServer) -> Refused:
    """Why the connection to llama-server broke: force-unloaded, crashed, or a plain network error."""
    await server.wait_exit(0.5)  # the socket may close a moment before the exit is reaped
    err = model.last_error or {}
    if server.exit is not None and not server.exit.expected:
        return Refused(Code.MODEL_CRASHED, f"llama-server for {model.id} {server.exit.reason} during the request; "
                       "the model is marked failed and the next request reloads it", model=model.id,
                       logs=server.exit.last_logs[-10:])
    if server.exit is not None or server.stopping or err.get("code") == Code.MODEL_UNLOADED.value:
        return Refused(Code.MODEL_UNLOADED, f"{model.id} was unloaded while the request was in flight",
                       model=model.id, retry_after=1)
    return Refused(Code.UPSTREAM_ERROR, f"lost the connection to llama-server for {model.id}", model=model.id)


def _validate(endpoint: str, body: dict) -> None:
    """The documented request model (fields it does not list pass through): llama-server answers some malformed
    bodies with a 500, e.g. a message without a role. Hot path: `_looks_valid` checks what the model requires in a
    few microseconds; pydantic runs only when that check fails, to name the field."""
    if _looks_valid(endpoint, body):
        return
    try:
        _REQUESTS[endpoint].model_validate(body)
    except ValidationError as exc:
        raise invalid_request(exc) from None


def _looks_valid(endpoint: str, body: dict) -> bool:
    """True only for bodies the request model accepts (schemas.py: strict types, extra fields allowed); a `lora`
    list is checked apart, by lora.overrides."""
    if not isinstance(body.get("model", ""), str) or body.get("stream") not in (None, True, False):
        return False
    if endpoint == "chat_completions":
        messages = body.get("messages")
        return type(messages) is list and all(type(m) is dict and type(m.get("role")) is str for m in messages)
    return ("prompt" if endpoint == "completions" else "input") in body


async def forward(request: web.Request, orch: Orchestrator, endpoint: str) -> web.StreamResponse:
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:  # also what orjson says for JSON nested deeper than it parses
        raise Refused(Code.INVALID_JSON, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Refused(Code.INVALID_REQUEST, "the request body must be a JSON object")
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise Refused(Code.INVALID_REQUEST, "model: Input should be a valid string")
    slot = orch.model(name)
    stream = body.get("stream") is True
    t0 = time.perf_counter()
    status = 500
    m = orch.metrics
    try:  # from here on every answer is counted for the model, refusals included
        _validate(endpoint, body)
        if endpoint == "chat_completions" and b'"image_url"' in raw and not slot.spec.vision and _has_image(body):
            # llama-server would answer 500 after a load on demand: name the fix instead
            raise Refused(Code.VISION_NOT_SUPPORTED, f"{slot.id} has no vision projector, so it cannot read images: "
                          "send the image to a model with an mmproj (GET /models: vision=true), or add `mmproj` to "
                          f"{slot.id}'s source in the model registry", model=slot.id)
        raw = await media_urls.localize(orch, raw, body)  # before a load on demand: refusing costs nothing
        # the request's LoRA scales, checked now (before a load on demand), completed once the process is known
        scales = lora.overrides(slot, body["lora"]) if "lora" in body and endpoint != "embeddings" else None
        if endpoint == "embeddings" and not serves_embeddings(slot.spec.extra_args):
            # llama-server would answer 501 after a load on demand: say what to change instead
            raise Refused(Code.EMBEDDINGS_NOT_ENABLED, f"{slot.id} does not serve embeddings: add \"--embeddings\" "
                          "to its extra_args in the model registry", model=slot.id)
        async with orch.lease(slot, timeout_s=_queue_timeout(request), gone=lambda: _client_gone(request)) as lease:
            server = lease.server
            if scales is not None:
                body["lora"] = lora.request_scales(slot, scales)
                raw = orjson.dumps(body)
            headers = _STREAM_HEADERS if stream else _JSON_HEADERS
            waited = {QUEUE_WAIT_HEADER: str(round(lease.waited_s * 1000))}
            if "Accept" in request.headers:
                headers = {**headers, "Accept": request.headers["Accept"]}
            try:
                # the idle timeout: until the answer's headers (a non-streamed answer's come when it is complete),
                # then per chunk of a stream (in _pass_stream). aiohttp's own sock_read stalled long streams.
                async with asyncio.timeout(orch.settings.upstream_idle_timeout_s) as deadline, \
                        await _send(orch, request.path, raw, headers, server) as up:
                    status = up.status
                    if stream and up.content_type == "text/event-stream":
                        deadline.reschedule(None)
                        status = await _pass_stream(request, up, slot, server, orch, waited)
                        if status == CLIENT_GONE:
                            raise ClientGone()
                        return request[PROXIED_STREAM]
                    data = await up.read()
                    if status == 200:
                        _count_tokens(orch, slot.id, data)
                    if _client_gone(request):
                        raise ClientGone()
                    if status == 500 and server.exit is None:
                        # llama-server answers many requests it cannot take (bad base64, an unsupported parameter,
                        # an image for a model without projector) with a 500 while staying up: a client error
                        raise _rejected(slot.id, data)
                    return web.Response(body=data, status=status, headers={
                        **{k: v for k, v in up.headers.items() if k.lower() not in _HOP_HEADERS}, **waited})
            except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
                raise _timed_out(orch, slot, exc, body) from None
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
                if _client_gone(request):
                    raise ClientGone() from None
                raise await _upstream_lost(slot, server) from None
    except Refused as err:
        status = STATUS[err.code]
        raise
    except (ClientGone, CallerGone, asyncio.CancelledError):  # cancelled: the server stops a handler whose client left
        status = CLIENT_GONE
        raise
    finally:
        m.child(m.requests, slot.id, endpoint, str(status)).inc()
        m.child(m.request_duration, slot.id, endpoint).observe(time.perf_counter() - t0)


CLIENT_GONE = 499  # nginx's code for "the client closed the connection": counted, never answered
QUEUE_WAIT_HEADER = "X-Queue-Wait-Ms"  # on every proxied answer: how long it waited in its model's queue
QUEUE_TIMEOUT_HEADER = "X-Queue-Timeout-S"  # a request's own bound on that wait
MIN_QUEUE_TIMEOUT_S, MAX_QUEUE_TIMEOUT_S = 1.0, 86400.0  # below a second no load could ever be waited for


def _queue_timeout(request: web.Request) -> float | None:
    raw = request.headers.get(QUEUE_TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not MIN_QUEUE_TIMEOUT_S <= value <= MAX_QUEUE_TIMEOUT_S:  # also NaN
        raise Refused(Code.INVALID_REQUEST, f"{QUEUE_TIMEOUT_HEADER}: seconds, from {MIN_QUEUE_TIMEOUT_S:g} to "
                      f"{MAX_QUEUE_TIMEOUT_S:g}, are expected (got {raw[:40]!r})")
    return value


PROXIED_STREAM = web.RequestKey("proxied_stream", web.StreamResponse)  # a stream's response, once prepared


class ClientGone(Exception):
    """The client hung up: nothing to answer, nothing to log as an error."""


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _rejected(model: str, data: bytes) -> Refused:
    try:
        message = orjson.loads(data)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = data[:500].decode(errors="replace")
    return Refused(Code.REJECTED_BY_LLAMA_SERVER, f"llama-server refused the request: {message}", model=model,
                   upstream_status=500)


def _timed_out(orch: Orchestrator, slot: ManagedModel, exc: BaseException, body: dict | None) -> Refused:
    """The 504 of a request whose llama-server did not answer in time, saying which bound ran out and what to do.
    `body`: the request before its answer began (a non-streamed answer comes whole, so silence means still generating;
    a stream's first token comes after the prompt); None mid-stream (silence between tokens: stuck or starved).
    Leaving the request closes the upstream connection, which makes llama-server stop that generation."""
    s, model = orch.settings, slot.id
    idle = s.upstream_idle_timeout_s
    if isinstance(exc, aiohttp.ConnectionTimeoutError):  # aiohttp's sock_connect bound (_send)
        return Refused(Code.UPSTREAM_TIMEOUT, f"llama-server for {model} did not accept the connection within "
                       f"{s.upstream_connect_timeout_s:g} s (MODEL_ORCHESTRATOR_UPSTREAM_CONNECT_TIMEOUT_S): it is "
                       f"overloaded or stuck; see `model-orchestrator logs {model}`", model=model, phase="connect",
                       timeout_s=s.upstream_connect_timeout_s)
    if body is None or body.get("stream") is True:
        return Refused(Code.UPSTREAM_TIMEOUT, f"llama-server for {model} sent no token for {idle:g} s "
                       f"{'in the middle of the stream' if body is None else 'before the first one'} "
                       f"(MODEL_ORCHESTRATOR_UPSTREAM_IDLE_TIMEOUT_S): it is stuck or the machine is overloaded; "
                       f"the request was ended. See `model-orchestrator logs {model}`", model=model,
                       phase="stream", timeout_s=idle)
    asked = next((body[k] for k in ("n_predict", "max_completion_tokens", "max_tokens")
                  if isinstance(body.get(k), int)), None)
    limit = asked if asked is not None else slot.spec.max_tokens
    said = (f"this request's limit: {limit} tokens" if asked is not None else
            "no limit: the model's max_tokens is -1" if limit == -1 else
            f"{limit} tokens, the model's max_tokens in the registry")
    return Refused(Code.UPSTREAM_TIMEOUT, f"llama-server for {model} sent nothing for {idle:g} s "
                   f"(MODEL_ORCHESTRATOR_UPSTREAM_IDLE_TIMEOUT_S). A non-streamed answer comes whole when it is "
                   f"complete, so the model was most likely still generating ({said}); its generation was stopped. "
                   f"Ask for fewer tokens (max_tokens), send \"stream\": true to get the tokens as they come, or "
                   f"raise MODEL_ORCHESTRATOR_UPSTREAM_IDLE_TIMEOUT_S", model=model, phase="answer", timeout_s=idle,
                   max_tokens=limit)


_JSON_HEADERS = {"Content-Type": "application/json"}
# llama-server closes the connection after a stream without saying so: never pool it
_STREAM_HEADERS = {"Content-Type": "application/json", "Connection": "close"}


async def _send(orch: Orchestrator, path: str, raw: bytes, headers: dict, server: LlamaServer):
    """POST upstream. A pooled keep-alive connection that llama-server has just closed (it keeps idle ones 5 s and
    serves 100 requests on one) fails before any byte of answer: that attempt is retried once, on a new connection.
    Connecting is bounded here; the silence between two reads is bounded by the caller (never the total)."""
    s = orch.settings
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=s.upstream_connect_timeout_s)
    for attempt in (1, 2):
        try:
            return await server.request("POST", path, data=raw, headers=headers, timeout=timeout)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            if attempt == 2 or server.exit is not None:
                raise


async def _pass_stream(request, up, slot, server, orch, waited: dict) -> int:
    """Pass an SSE stream through chunk by chunk; the response goes into request[PROXIED_STREAM]. Returns the
    status to count: 200, CLIENT_GONE when the client hung up, or the error's when llama-server failed mid-stream."""
    resp = web.StreamResponse(status=up.status, headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no", **waited})
    request[PROXIED_STREAM] = resp
    await resp.prepare(request)
    scanner = UsageScanner()
    status = up.status
    chunks = up.content.iter_any()
    idle = orch.settings.upstream_idle_timeout_s
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk = await chunks.__anext__()
        except StopAsyncIteration:
            break
        except (aiohttp.ServerTimeoutError, TimeoutError, aiohttp.ClientConnectionError,
                aiohttp.ClientPayloadError) as exc:
            if _client_gone(request):
                status = CLIENT_GONE
                break
            # the status line is gone already: report the failure as a last SSE event, as OpenAI does
            err = (_timed_out(orch, slot, exc, None) if isinstance(exc, TimeoutError)
                   else await _upstream_lost(slot, server))
            status = STATUS[err.code]
            if not await _write(resp, b"data: " + orjson.dumps(refusal_body(err)) + b"\n\n"):
                status = CLIENT_GONE
            break
        if not await _write(resp, chunk):
            status = CLIENT_GONE  # leaving the `async with` closes the upstream connection: llama-server stops
            break
        scanner.feed(chunk)
    _record(orch, slot.id, scanner.prompt_tokens, scanner.completion_tokens)
    if status != CLIENT_GONE:
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
    return status


async def _write(resp: web.StreamResponse, data: bytes) -> bool:
    """Write to the client; False when it has hung up."""
    try:
        await resp.write(data)
        return True
    except ConnectionError:  # aiohttp's ClientConnectionResetError is one
        return False


def _has_image(body: dict) -> bool:
    """Does any message carry image_url content (OpenAI's list-of-parts form)?"""
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image_url" for p in content):
            return True
    return False


def _count_tokens(orch: Orchestrator, model: str, data: bytes) -> None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    if isinstance(obj, dict):
        scanner = UsageScanner()
        scanner.read(obj)
        _record(orch, model, scanner.prompt_tokens, scanner.completion_tokens)


def _record(orch: Orchestrator, model: str, prompt: int | None, completion: int | None) -> None:
    if prompt:
        orch.metrics.prompt_tokens.labels(model).inc(prompt)
    if completion:
        orch.metrics.tokens_generated.labels(model).inc(completion)


def list_models(orch: Orchestrator) -> OpenAIModelList:
    created = int(time.time())
    return OpenAIModelList(data=[OpenAIModel(id=s.id, created=created, owned_by="model-orchestrator", status=s.state)
                                 for s in orch.models.values()])
