"""The OpenAI-compatible pass-through: a request is routed by its `model` to that model's llama-server.

Bodies go upstream byte for byte (images, tools, tool_choice untouched); SSE streams come back chunk by chunk as
llama-server writes them, never buffered whole. Token counts are read from the responses' usage for metrics.
"""

from __future__ import annotations

import json
import time

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from .errors import Code, Refused
from .http_errors import refusal_body, refusal_response
from .lifecycle import LlamaServer, ManagedModel
from .llama_args import serves_embeddings
from .orchestrator import Orchestrator
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

_REQUESTS = {"chat_completions": ChatCompletionRequest, "completions": CompletionRequest, "embeddings": EmbeddingRequest}
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
    bodies with a 500, e.g. a message without a role."""
    try:
        _REQUESTS[endpoint].model_validate(body)
    except ValidationError as exc:
        problems = [{"field": ".".join(str(p) for p in e["loc"]) or "(body)", "problem": e["msg"]} for e in exc.errors()]
        raise Refused(Code.INVALID_REQUEST, f"{problems[0]['field']}: {problems[0]['problem']}",
                      problems=problems) from None


async def forward(request: web.Request, orch: Orchestrator, endpoint: str) -> web.StreamResponse:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json can parse
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
    m.in_flight.labels(slot.id).inc()
    try:  # from here on every answer is counted for the model, refusals included
        _validate(endpoint, body)
        if endpoint == "embeddings" and not serves_embeddings(slot.spec.extra_args):
            # llama-server would answer 501 after a load on demand: say what to change instead
            raise Refused(Code.EMBEDDINGS_NOT_ENABLED, f"{slot.id} does not serve embeddings: add \"--embeddings\" "
                          "to its extra_args in the model registry", model=slot.id)
        if endpoint == "chat_completions" and b'"image_url"' in raw and not slot.spec.vision \
                and _has_image(body):
            # llama-server would answer 500: name the fix instead
            raise Refused(Code.VISION_NOT_SUPPORTED, f"{slot.id} has no vision projector, so it cannot read images: "
                          "send the image to a model with an mmproj (GET /models: vision=true), or add `mmproj` to "
                          f"{slot.id}'s source in the model registry", model=slot.id)
        limit = orch.queue_limit(slot)
        if limit and slot.in_flight >= limit:  # bounded: a burst cannot pile up unbounded work behind one model
            raise Refused(Code.OVERLOADED, f"{slot.id} already has {slot.in_flight} requests waiting or in flight "
                          f"(limit {limit}: MODEL_ORCHESTRATOR_MAX_QUEUE plus llama-server's slots); retry later",
                          retry_after=1, model=slot.id, in_flight=slot.in_flight, limit=limit)
        with slot.request():
            server = await orch.ready_server(slot)
            headers = {"Content-Type": "application/json"}
            if stream:  # llama-server closes the connection after a stream without saying so: never pool it
                headers["Connection"] = "close"
            if "Accept" in request.headers:
                headers["Accept"] = request.headers["Accept"]
            try:
                async with await _send(orch.http, f"{server.base_url}{request.path}", raw, headers, server) as up:
                    status = up.status
                    if stream and up.content_type == "text/event-stream":
                        return await _pass_stream(request, up, slot, server, orch, endpoint)
                    data = await up.read()
                    if up.status == 200 and up.content_type == "application/json":
                        _count_tokens(orch, slot.id, data)
                    return web.Response(body=data, status=up.status, headers={
                        k: v for k, v in up.headers.items() if k.lower() not in _HOP_HEADERS})
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
                raise await _upstream_lost(slot, server) from None
    except Refused as err:
        status = refusal_response(err).status
        raise
    finally:
        m.in_flight.labels(slot.id).dec()
        m.requests.labels(slot.id, endpoint, str(status)).inc()
        m.request_duration.labels(slot.id, endpoint).observe(time.perf_counter() - t0)


async def _send(http: aiohttp.ClientSession, url: str, raw: bytes, headers: dict, server: LlamaServer):
    """POST upstream. A pooled keep-alive connection that llama-server has just closed (it keeps idle ones 5 s and
    serves 100 requests on one) fails before any byte of answer: that attempt is retried once, on a new connection."""
    for attempt in (1, 2):
        try:
            return await http.post(url, data=raw, headers=headers, timeout=aiohttp.ClientTimeout(total=None))
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            if attempt == 2 or server.exit is not None:
                raise


async def _pass_stream(request, up, slot, server, orch, endpoint) -> web.StreamResponse:
    resp = web.StreamResponse(status=up.status, headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    scanner = UsageScanner()
    try:
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
            scanner.feed(chunk)
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
        # the status line is gone already: report the failure as a last SSE event, as OpenAI does
        err = await _upstream_lost(slot, server)
        await resp.write(b"data: " + json.dumps(refusal_body(err)).encode() + b"\n\n")
    _record(orch, slot.id, scanner.prompt_tokens, scanner.completion_tokens)
    await resp.write_eof()
    return resp


def _has_image(body: dict) -> bool:
    """Does any message carry image_url content (OpenAI's list-of-parts form)?"""
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image_url" for p in content):
            return True
    return False


def _count_tokens(orch: Orchestrator, model: str, data: bytes) -> None:
    try:
        obj = json.loads(data)
    except ValueError:
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


def list_models(orch: Orchestrator) -> dict:
    created = int(time.time())
    return {"object": "list", "data": [
        {"id": s.id, "object": "model", "created": created, "owned_by": "model-orchestrator", "status": s.state}
        for s in orch.models.values()]}
