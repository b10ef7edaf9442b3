"""What the API can answer: every route, its request and response models, in one table (ROUTES).

/openapi.json and /docs are generated from this table; errors are JSON on every route (OpenAI style); when an API
key is configured every route but /health, /metrics and the docs needs `Authorization: Bearer <key>`; without one,
browser_guard refuses web pages of other origins and Host names that DNS rebinding would send.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import hmac
import ipaddress
import json
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from aiohttp import web
from pydantic import BaseModel, ValidationError

from .. import __version__

from . import callbacks, fleet, proxy, views

from ..core import lora
from ..platform.errors import Code, Refused
from ..core.events import EVENT_TYPES
from .fast_lane import TABLE, Table, reset_connection
from .http_errors import HttpRefused, error_body, invalid_request, refusal_response
from ..platform.gpu import GpuSampler
from ..platform.errors import ModelFilesMissing
from .openapi import build_openapi
from ..core.orchestrator import Orchestrator
from .schemas import (ChatCompletionRequest, CompletionRequest, EmbeddingRequest, EstimateOut, EstimateRequest,
                      EstimateResponse, EventOut, FleetResponse, FitOut, HealthResponse, LoadCallback, LoadRequest,
                      LoadResponse, LogsResponse, LoraAdaptersResponse, LoraScalesRequest, ModelsResponse,
                      OpenAIModelList, OpenAIResponse, RenewRequest, ReservationList, ReservationOut,
                      ReservationRequest, StatusResponse, UnloadRequest, UnloadResponse)
from ..core.states import LoadResult
from .status_cache import StatusCache

log = logging.getLogger("model_orchestrator.api")
ORCH = web.AppKey("orchestrator", Orchestrator)
STATUS = web.AppKey("status_cache", StatusCache)
OPENAPI = web.AppKey("openapi", dict)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    auth: bool = True
    tag: str = "models"
    stream: bool = False
    events: bool = False  # the answer is only a text/event-stream of `response` objects (GET /models/events)
    callback: type[BaseModel] | None = None  # what the route may POST to the request's callback_url later
    description: str = ""
    query: tuple[dict, ...] = ()  # OpenAPI parameters beyond the path's (in: query or header)
    response_headers: tuple[tuple[str, str], ...] = ()  # headers of the success answer, with what they say
    statuses: tuple[tuple[int, str], ...] = ()  # answers beyond the common errors (openapi._ERRORS)


async def _body(request: web.Request, model: type[BaseModel]):
    """Validate a JSON body with the route's model; a bad body is a 400 naming the field."""
    charset = request.charset  # JSON is UTF-8 (RFC 8259); another declared charset is refused, not guessed
    if charset is not None and _codec_name(charset) not in ("utf-8", "ascii"):
        raise Refused(Code.UNSUPPORTED_CHARSET, f"charset={charset!r} is not supported: send the JSON body as UTF-8 "
                      "(Content-Type: application/json)")
    timeout = request.app[ORCH].settings.idle_timeout_s
    try:  # a client that announces a body and then trickles it must not hold a handler forever
        raw = await asyncio.wait_for(request.read(), timeout)
    except TimeoutError:
        raise HttpRefused(Code.BODY_TIMEOUT, f"the request body did not arrive within {timeout:g} s "
                          "(MODEL_ORCHESTRATOR_IDLE_TIMEOUT_S)", headers={"Connection": "close"}) from None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested deeper than json can parse
        raise Refused(Code.INVALID_JSON, "the request body is not valid JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_request(exc) from None


def _codec_name(charset: str) -> str | None:
    """The canonical name of a charset ('UTF8' -> 'utf-8'), None when Python knows no such codec."""
    try:
        return codecs.lookup(charset).name
    except LookupError:
        return None


def _json(answer: BaseModel, status: int = 200) -> web.Response:
    """An answer, built as its documented model (the OpenAPI document cannot drift from the answers)."""
    return web.Response(body=answer.model_dump_json().encode(), status=status, content_type="application/json")


# The answers of the polled read-only routes (views.py), built and serialised once per state (status_cache.py), then
# served as bytes: by their handlers below, and before aiohttp by fast_lane.py for plain GETs. path -> builder.
async def _build_health(orch: Orchestrator) -> bytes:
    return views.health(orch).model_dump_json().encode()


async def _build_status(orch: Orchestrator) -> bytes:
    return views.status(orch, orch.gpu_view.latest()).model_dump_json().encode()  # the sampler's GPU readings


async def _build_models(orch: Orchestrator) -> bytes:
    queues = orch.dispatcher.queue_views()  # on the loop, which changes them
    answer = await asyncio.to_thread(views.registry, orch, queues)  # looks for files in the HF cache
    return answer.model_dump_json().encode()


CACHED: dict[str, Callable[[Orchestrator], Awaitable[bytes]]] = {
    "/health": _build_health, "/models/status": _build_status, "/models": _build_models}


async def _cached(request: web.Request) -> web.Response:
    # one answer per route: these routes read no query, so none is part of the key
    return web.Response(body=await request.app[STATUS].get(request.path), content_type="application/json")


# ---- handlers ---------------------------------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    return await _cached(request)


async def metrics(request: web.Request) -> web.Response:
    m = request.app[ORCH].metrics
    frozen = m.freeze()  # on the event loop, where the state changes: what this scrape shows, copied
    body = await asyncio.to_thread(m.render, frozen)  # formatting off the loop, over values nobody mutates
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def models_status(request: web.Request) -> web.Response:
    return await _cached(request)


async def fleet_members(request: web.Request) -> web.Response:
    settings = request.app[ORCH].settings
    found = await fleet.resolve(settings.fleet, settings.port)
    return _json(FleetResponse(node=settings.node_name, fleet=settings.fleet, members=found.members,
                               errors=found.errors))


async def models_list(request: web.Request) -> web.Response:
    return await _cached(request)


async def models_load(request: web.Request) -> web.Response:
    req = await _body(request, LoadRequest)
    orch = request.app[ORCH]
    if req.service != "llama-cpp" and orch.registry.lookup(req.model) is None:
        # the guide's pattern for other GPU services: "load wan2.1-14b in comfyui" reserves its memory (making room)
        if req.vram_mb is None:
            raise Refused(Code.UNKNOWN_SERVICE, f"{req.model!r} of service {req.service!r} is not run by this "
                          "orchestrator: pass vram_mb to reserve GPU memory for it (it then counts in admission)")
        r = await orch.admission.reserve(req.service, req.vram_mb, ttl_s=req.ttl_s, model=req.model,
                                         priority=req.priority, allow_eviction=bool(req.allow_eviction),
                                         force=req.force)
        return _json(LoadResponse(model=req.model, status="reserved", result=LoadResult.RESERVED,
                                  reservation=ReservationOut(**r.to_dict())))
    kwargs = dict(priority=req.priority, service=req.service, timeout_s=req.timeout_s,
                  allow_eviction=req.allow_eviction, force=req.force)
    if req.callback_url is not None:
        if req.wait:
            raise Refused(Code.INVALID_REQUEST, "callback_url needs wait=false (with wait=true the answer itself "
                          "is the outcome)")
        callbacks.check_url(req.callback_url, orch.settings.callback_hosts)
    outcome = await orch.ensure_loaded(req.model, wait=req.wait, **kwargs)
    if req.callback_url is not None:
        orch.run_in_background(callbacks.after_load(orch, outcome, req.callback_url))
    model, server = outcome.model, outcome.model.server
    return _json(LoadResponse(model=model.id, status=model.state, result=outcome.result,
                              load_seconds=model.load_seconds, pid=server.pid if server else None, gpu=model.gpu,
                              estimate_mb=round(model.estimate.total_mb, 1) if model.estimate else None,
                              evicted=outcome.evicted, download=orch.downloads.view(model.id)),
                 status=202 if outcome.result in (LoadResult.LOADING, LoadResult.DOWNLOADING, LoadResult.QUEUED)
                 else 200)


async def models_unload(request: web.Request) -> web.Response:
    req = await _body(request, UnloadRequest)
    outcome = await request.app[ORCH].unload(req.model, service=req.service, force=req.force,
                                             drain_timeout_s=req.drain_timeout_s, save_slots=req.save_slots)
    return _json(UnloadResponse(model=outcome.model, status=outcome.status, result=outcome.result,
                                released=[ReservationOut(**r.to_dict()) for r in outcome.released]))


async def models_estimate(request: web.Request) -> web.Response:
    req = await _body(request, EstimateRequest)
    orch = request.app[ORCH]
    model = orch.model(req.model)
    try:
        est = await orch.admission.estimate(model.spec, context_size=req.context_size, cache_type=req.cache_type,
                                            n_gpu_layers=req.n_gpu_layers)
    except ModelFilesMissing as exc:  # hub.HubError too: unreachable, wrong repo, gated... each with its code
        exc.details.setdefault("model", model.id)
        raise
    except (ValueError, OSError) as exc:
        raise Refused(Code.UNREADABLE_MODEL, f"cannot read the GGUF header of {model.id}: {exc}",
                      model=model.id) from None
    fit = await orch.admission.check_fit(model.spec, est)
    return _json(EstimateResponse(model=model.id, context_size=req.context_size or model.spec.context_size,
                                  cache_type=est.cache_type, estimate=EstimateOut(**est.to_dict()), fit=FitOut(**fit)))


async def reservations_list(request: web.Request) -> web.Response:
    return _json(ReservationList(reservations=[ReservationOut(**r.to_dict())
                                               for r in request.app[ORCH].reservations.active()]))


async def reservations_create(request: web.Request) -> web.Response:
    req = await _body(request, ReservationRequest)
    r = await request.app[ORCH].admission.reserve(req.service, req.vram_mb, ttl_s=req.ttl_s, gpu=req.gpu,
                                                  model=req.model, priority=req.priority,
                                                  allow_eviction=req.allow_eviction, force=req.force)
    return _json(ReservationOut(**r.to_dict()), status=201)


def _reservation_id(request: web.Request) -> str:
    rid = request.match_info["id"]
    if not rid.isalnum() or len(rid) > 64:
        raise Refused(Code.INVALID_REQUEST, "a reservation id is letters and digits")
    return rid


async def reservations_renew(request: web.Request) -> web.Response:
    rid = _reservation_id(request)
    req = await _body(request, RenewRequest) if request.can_read_body else RenewRequest()
    r = request.app[ORCH].reservations.renew(rid, req.ttl_s)
    if r is None:
        raise Refused(Code.RESERVATION_NOT_FOUND, f"no reservation {rid} (expired or released)")
    request.app[ORCH].events.publish("reservation", action="renewed", reservation=r.to_dict())
    return _json(ReservationOut(**r.to_dict()))


async def reservations_release(request: web.Request) -> web.Response:
    rid = _reservation_id(request)
    r = request.app[ORCH].reservations.release(rid)
    if r is None:
        raise Refused(Code.RESERVATION_NOT_FOUND, f"no reservation {rid} (expired or released)")
    request.app[ORCH].events.publish("reservation", action="released", reservation=r.to_dict())
    return _json(ReservationOut(**r.to_dict()))


async def model_logs(request: web.Request) -> web.Response:
    model = request.app[ORCH].model(request.match_info["model"])
    try:
        n = max(1, min(int(request.query.get("lines", "100")), 10000))
    except ValueError:
        raise Refused(Code.INVALID_REQUEST, "lines must be an integer") from None
    server = model.server
    lines = server.last_logs(n) if server else (model.last_error or {}).get("logs", [])[-n:]
    return _json(LogsResponse(model=model.id, pid=server.pid if server else None, lines=lines))


def _lora_answer(model) -> web.Response:
    return _json(LoraAdaptersResponse(model=model.id, status=model.state, adapters=lora.view(model)))


async def lora_adapters(request: web.Request) -> web.Response:
    return _lora_answer(request.app[ORCH].model(request.match_info["model"]))


async def lora_adapters_set(request: web.Request) -> web.Response:
    orch = request.app[ORCH]
    model = orch.model(request.match_info["model"])
    req = await _body(request, LoraScalesRequest)
    scales = {a.name: a.scale for a in req.adapters}
    if len(scales) != len(req.adapters):
        raise Refused(Code.INVALID_REQUEST, "adapters: each adapter may be named once")
    await lora.set_scales(model, scales, orch.events)
    return _lora_answer(model)


EVENTS_KEEPALIVE_S = 15.0  # a comment line this often keeps proxies and n8n from closing an idle stream


def _csv_query(request: web.Request, name: str) -> set[str] | None:
    raw = request.query.get(name, "").strip()
    return {v.strip() for v in raw.split(",") if v.strip()} or None


_one_type = "(?:" + "|".join(EVENT_TYPES) + ")"
_EVENT_TYPES_CSV = rf"^ *(?:{_one_type}(?: *, *{_one_type})*)? *$"  # what models_events accepts, for the schema


async def models_events(request: web.Request) -> web.StreamResponse:
    orch = request.app[ORCH]
    types = _csv_query(request, "types")
    unknown = sorted((types or set()) - set(EVENT_TYPES))
    if unknown:
        raise Refused(Code.INVALID_REQUEST, f"unknown event type(s) {', '.join(unknown)}; known: "
                      f"{', '.join(EVENT_TYPES)}")
    models = _csv_query(request, "model")
    last = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    if last is not None and not (last.isascii() and last.isdigit() and len(last) <= 18):  # "²" is a digit to isdigit
        raise Refused(Code.INVALID_REQUEST, "Last-Event-ID must be the number of an event")
    sub = orch.events.subscribe(types=types, models=models, last_event_id=int(last) if last else None)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    stalled_s = orch.settings.idle_timeout_s

    async def send(data: bytes | None) -> None:  # None: the end of the stream
        # a client that stopped reading is cut off: its socket and our buffer stay full, nothing else would end it
        try:
            await asyncio.wait_for(resp.write(data) if data is not None else resp.write_eof(), stalled_s)
        except TimeoutError:
            if request.transport is not None:
                reset_connection(request.transport)
            raise ConnectionResetError("the client read nothing for MODEL_ORCHESTRATOR_IDLE_TIMEOUT_S") from None

    try:
        await resp.prepare(request)
        await send(b": model-orchestrator events\nretry: 2000\n\n")
        while True:
            try:
                event = await sub.next(EVENTS_KEEPALIVE_S)
            except TimeoutError:
                await send(b": keepalive\n\n")
                continue
            if event is None:  # shutdown, or this client fell behind (its last event said so)
                break
            await send(f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(event.to_dict())}\n\n".encode())
        await send(None)
    except (ConnectionResetError, ConnectionError):
        pass  # the client went away, or stopped reading
    finally:
        sub.close()
    return resp


async def v1_models(request: web.Request) -> web.Response:
    return _json(proxy.list_models(request.app[ORCH]))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await proxy.forward(request, request.app[ORCH], "chat_completions")


async def completions(request: web.Request) -> web.StreamResponse:
    return await proxy.forward(request, request.app[ORCH], "completions")


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await proxy.forward(request, request.app[ORCH], "embeddings")


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


_PROXY_STATUSES = ((503, "queue_full (MODEL_ORCHESTRATOR_MAX_QUEUE requests already wait for this model) or "
                        "queue_timeout (it waited longer than X-Queue-Timeout-S or MODEL_ORCHESTRATOR_QUEUE_TIMEOUT_S: "
                        "`waited_s`, `waiting_for`); retry after Retry-After seconds. Also a failed load or shutdown"),
                   (502, "llama-server crashed or the connection to it broke during the request"),
                   (504, "upstream_timeout: llama-server sent nothing for MODEL_ORCHESTRATOR_UPSTREAM_IDLE_TIMEOUT_S"))

# the proxied routes: every request waits in its model's queue (dispatcher.py), bounded per request by a header
_QUEUE_PARAMS = ({"name": proxy.QUEUE_TIMEOUT_HEADER, "in": "header", "required": False,
                  "description": "how long this request may wait in its model's queue (its load, its turn) before 503 "
                  "queue_timeout; default MODEL_ORCHESTRATOR_QUEUE_TIMEOUT_S",
                  "schema": {"type": "number", "minimum": proxy.MIN_QUEUE_TIMEOUT_S,
                             "maximum": proxy.MAX_QUEUE_TIMEOUT_S}},)
_QUEUE_HEADERS = ((proxy.QUEUE_WAIT_HEADER, "milliseconds the request waited in its model's queue before it was sent "
                   "to llama-server (0: at once)"),)

ROUTES: list[Route] = [
    Route("GET", "/health", health, "Liveness of the orchestrator", response=HealthResponse, auth=False, tag="service"),
    Route("GET", "/metrics", metrics, "Prometheus metrics (GPU, models, requests, tokens)", auth=False, tag="service"),
    Route("GET", "/models/status", models_status, "GPU memory and the models that are not unloaded",
          response=StatusResponse,
          description="The guide's shape (total_mb, used_mb, free_mb, utilization_percent, loaded_models) plus "
                      "per-GPU details. In CPU mode the memory fields are null and `note` says why."),
    Route("GET", "/fleet", fleet_members, "Every sidecar of this fleet (MODEL_ORCHESTRATOR_FLEET resolved now)",
          response=FleetResponse, tag="service",
          description="Discovery for clients given one URL (the n8n nodes' credential, `status`): they then ask every "
          "member themselves; each sidecar decides only for its own GPUs. In Kubernetes the setting is the headless "
          "Service's DNS name, which resolves to every ready sidecar pod."),
    Route("GET", "/models", models_list, "The model registry with each model's state (for dropdowns)",
          response=ModelsResponse),
    Route("POST", "/models/load", models_load, "Load a model (joins a load under way)", request=LoadRequest,
          response=LoadResponse, description="Answers when llama-server is ready; with wait=false, 202 as soon as "
          "the load is admitted and started (status `loading`; a refusal is still an error). A model whose files "
          "are missing is downloaded first (status `downloading`, progress in `download` here and in /models/status; "
          "timeout_s counts llama-server's start only), unless MODEL_ORCHESTRATOR_DOWNLOAD_ON_LOAD or the model's "
          "download_on_load is off; before downloading, the estimate from the file's header on the Hub must fit "
          "(else 409 insufficient_vram) and the disk must hold the files (else 507 insufficient_disk): nothing is "
          "written then. A model that cannot start answers 503 with llama-server's last log lines.",
          statuses=((202, "wait=false: the load was admitted and started, or its download began (result downloading)"),
                    (507, "insufficient_disk: the files to download do not fit on the disk of HF_HOME"),
                    (403, "callback_not_allowed: callback_url's host is not in MODEL_ORCHESTRATOR_CALLBACK_HOSTS")),
          callback=LoadCallback),
    Route("POST", "/models/unload", models_unload, "Unload a model", request=UnloadRequest, response=UnloadResponse,
          description="Without force, waits up to drain_timeout_s for requests in flight (new ones get 503 + "
          "Retry-After meanwhile) and then refuses with 409, changing nothing. With force, stops llama-server at once; "
          "requests in flight end with a model_unloaded error. An unload during a load cancels it; during a download "
          "it stops it (result cancelled_download; what arrived is kept and the next load resumes it)."),
    Route("POST", "/models/estimate", models_estimate,
          "Predicted GPU memory of a model's llama-server, and whether it fits now",
          request=EstimateRequest, response=EstimateResponse,
          description="From the GGUF header only: weights on the GPU, KV cache, compute buffer, projector, CUDA "
          "overhead.",
          statuses=((422, "the model file is not a readable GGUF"),)),
    Route("GET", "/reservations", reservations_list, "Memory reserved by other GPU services", response=ReservationList,
          tag="reservations"),
    Route("POST", "/reservations", reservations_create, "Reserve GPU memory for another service (WhisperX, ComfyUI...)",
          request=ReservationRequest, response=ReservationOut, status=201, tag="reservations",
          description="Counts in admission at once; may evict models of lower priority (or equal, with allow_eviction) "
                      "to make room; refused with 409 insufficient_vram otherwise, and with 409 too_many_reservations "
                      "beyond MODEL_ORCHESTRATOR_MAX_RESERVATIONS live ones. Expires after ttl_s unless renewed."),
    Route("POST", "/reservations/{id}/renew", reservations_renew, "Extend a reservation's lifetime",
          request=RenewRequest,
          response=ReservationOut, tag="reservations"),
    Route("DELETE", "/reservations/{id}", reservations_release, "Release a reservation", response=ReservationOut,
          tag="reservations"),
    Route("GET", "/models/events", models_events, "Server-sent events: state changes, load progress, evictions, "
          "reservations, crashes", response=EventOut, events=True,
          description="A `text/event-stream` that stays open (a `: keepalive` comment every 15 s). Each event has "
          "`id:` (send it back as `Last-Event-ID` when reconnecting to replay what was missed), `event:` (its type) "
          "and `data:` (JSON). Types: " + "; ".join(f"`{k}`: {v}" for k, v in EVENT_TYPES.items()) + ". A client "
          "that falls behind gets an `overflow` event and the stream ends (reconnect with Last-Event-ID); one that "
          "reads nothing for MODEL_ORCHESTRATOR_IDLE_TIMEOUT_S while events wait for it is disconnected.",
          query=({"name": "types", "in": "query", "required": False, "description": "comma-separated event types "
                  "(default: all)", "schema": {"type": "string", "pattern": _EVENT_TYPES_CSV}},
                 {"name": "model", "in": "query", "required": False, "description": "comma-separated model ids "
                  "(default: all; reservation events always pass)", "schema": {"type": "string"}},
                 {"name": "last_event_id", "in": "query", "required": False, "description": "as the Last-Event-ID "
                  "header: replay the recent events after this one", "schema": {"type": "integer"}})),
    Route("GET", "/models/{model}/logs", model_logs, "The last lines llama-server printed (?lines=N)",
          response=LogsResponse,
          query=({"name": "lines", "in": "query", "required": False, "description": "how many lines (1..10000)",
                  "schema": {"type": "integer", "default": 100}},)),
    Route("GET", "/models/{model}/lora-adapters", lora_adapters, "A model's LoRA adapters and their scales",
          response=LoraAdaptersResponse, description="By name (the registry's `lora`), with llama-server's ids: the "
          "scales its llama-server applies now when it is loaded, else the registry's (each load starts from them)."),
    Route("POST", "/models/{model}/lora-adapters", lora_adapters_set, "Set a loaded model's LoRA adapter scales",
          request=LoraScalesRequest, response=LoraAdaptersResponse,
          description="By adapter name; adapters not listed keep their scales. Applies to the requests that start "
          "from now on and lasts until the model is unloaded. A model that is not loaded answers 409 "
          "model_not_loaded; an adapter the model does not have, 400 unknown_adapter. A single request can carry "
          "its own scales instead: `lora` in /v1/chat/completions.",
          statuses=((409, "model_not_loaded: load the model first"),
                    (502, "upstream_error: llama-server refused the scales or did not answer"))),
    Route("GET", "/v1/models", v1_models, "OpenAI: list models", response=OpenAIModelList, tag="openai"),
    Route("POST", "/v1/chat/completions", chat_completions, "OpenAI: chat (images, tools, streaming passed through)",
          request=ChatCompletionRequest, response=OpenAIResponse, tag="openai", statuses=_PROXY_STATUSES, stream=True,
          query=_QUEUE_PARAMS, response_headers=_QUEUE_HEADERS,
          description="Routed by `model` to its llama-server, which is loaded on demand when the registry allows. A "
          "request whose model is not ready (loading, not loaded, its room held by busy models, its turn not come) "
          "waits in the model's queue and is answered when the model runs."),
    Route("POST", "/v1/completions", completions, "OpenAI: text completion", request=CompletionRequest,
          response=OpenAIResponse, tag="openai", statuses=_PROXY_STATUSES, stream=True, query=_QUEUE_PARAMS,
          response_headers=_QUEUE_HEADERS),
    Route("POST", "/v1/embeddings", embeddings, "OpenAI: embeddings (the model needs --embeddings in extra_args)",
          request=EmbeddingRequest, response=OpenAIResponse, tag="openai", statuses=_PROXY_STATUSES,
          query=_QUEUE_PARAMS, response_headers=_QUEUE_HEADERS),
    Route("GET", "/openapi.json", openapi_json, "This API's OpenAPI document", auth=False, tag="service"),
]

PUBLIC_PREFIXES = ("/docs",)  # Swagger UI's page and assets: the page itself holds the "Authorize" button
# What monitoring scrapes by whatever name it knows the sidecar under (compose's `llama-cpp:8000`, a Kubernetes
# service): exempt from the Host check of browser_guard. Public with a key too; it shows model names and GPU figures,
# never a model's answers and never a way to change anything.
ANY_HOST_PATHS = frozenset({"/metrics"})


# ---- middlewares ------------------------------------------------------------------------------------------------
def _route_label(request: web.Request) -> str:
    info = request.match_info
    return info.route.resource.canonical if info.route.resource is not None else "unmatched"


@web.middleware
async def errors_and_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    t0 = time.perf_counter()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except Refused as err:
        resp = refusal_response(err)
        status = resp.status
        return resp
    except web.HTTPException as exc:
        status = exc.status
        code = {404: Code.NOT_FOUND, 405: Code.METHOD_NOT_ALLOWED, 413: Code.BODY_TOO_LARGE}.get(exc.status)
        message = {404: f"no route {request.method} {request.path} (GET /docs lists them)",
                   405: f"{request.method} is not allowed on {request.path}",
                   413: f"the body is larger than {request.app[ORCH].settings.max_body_mb} MB "
                        "(MODEL_ORCHESTRATOR_MAX_BODY_MB)"}.get(exc.status, exc.reason)
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None  # 405 lists the methods (RFC 9110)
        if code is None:  # an HTTP error aiohttp raised that we have no code for: keep its status
            return web.json_response(error_body(exc.status, "http_error", message), status=exc.status)
        return refusal_response(Refused(code, message), headers=allow)
    except proxy.ClientGone:  # the client hung up mid-answer: counted, nothing to answer or to log
        status = proxy.CLIENT_GONE
        return request.get(proxy.PROXIED_STREAM) or web.Response(status=proxy.CLIENT_GONE)
    except asyncio.CancelledError:
        status = proxy.CLIENT_GONE  # the client went away
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return refusal_response(Refused(Code.INTERNAL_ERROR, "internal error; the sidecar's log has the details"))
    finally:
        count_request(request.app[ORCH], _route_label(request), request.method, status, time.perf_counter() - t0)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def count_request(orch: Orchestrator, route: str, method: str, status: int, seconds: float) -> None:
    """The request metrics of one answer (errors_and_metrics, and fast_lane for the answers it sends itself). Label
    values are bounded: a method aiohttp parsed but nobody uses (any token is one) counts as `other`."""
    m = orch.metrics
    method = method if method in _METHODS else "other"
    m.child(m.http_requests, route, method, str(status)).inc()
    m.child(m.http_duration, route, method).observe(seconds)


# The access rules: a Guard sees the path and the three headers it may judge (None when absent, decoded as aiohttp
# decodes them) and returns the refusal to raise, or None. guard_middleware applies it to every request aiohttp
# handles; fast_lane.py asks the same function before it answers a request itself.
Guard = Callable[[str, "str | None", "str | None", "str | None"], "Exception | None"]


def request_guard(settings) -> Guard:
    """The API key's rule when a key is set, else the browser guard's."""
    if settings.api_key:
        return api_key_guard(settings.api_key, {r.path for r in ROUTES if not r.auth})
    return browser_guard(settings)


def guard_middleware(guard: Guard):
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        h = request.headers
        refusal = guard(request.path, h.get("Host"), h.get("Origin"), h.get("Authorization"))
        if refusal is not None:
            raise refusal
        return await handler(request)

    return check


def api_key_guard(api_key: str, public_paths: set[str]) -> Guard:
    expected = f"Bearer {api_key}".encode()

    def check(path: str, host: str | None, origin: str | None, authorization: str | None) -> Exception | None:
        if path in public_paths or path.startswith(PUBLIC_PREFIXES):
            return None
        # aiohttp decodes header bytes that are not UTF-8 with surrogateescape: encode them back the same way
        given = (authorization or "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):  # constant time: no timing oracle on the key
            return HttpRefused(Code.INVALID_API_KEY, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               headers={"WWW-Authenticate": "Bearer"})
        return None

    return check


def _split_host(host: str) -> str:
    """The name or address of a Host header or an origin's authority, without the port ('[::1]:8000' -> '::1')."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def browser_guard(settings):
    """Without an API key, a web page must not drive the API (a text/plain POST needs no CORS preflight) nor read
    it through DNS rebinding. Refused with 403: an `Origin` that is neither this sidecar's own nor listed in
    MODEL_ORCHESTRATOR_ALLOWED_ORIGINS; a `Host` that is not loopback, an IP address, the bind address or a name
    listed in MODEL_ORCHESTRATOR_ALLOWED_HOSTS (a rebinding page reaches us under its own domain name; an IP
    literal cannot be served by anyone but whoever listens there), except on ANY_HOST_PATHS (/metrics: Prometheus
    scrapes by a service name). Clients that are not browsers (n8n, curl, the
    CLI) send no Origin and are unaffected."""
    hosts = {"localhost", settings.host.lower(), *settings.allowed_hosts}
    origins = set(settings.allowed_origins)

    def host_allowed(host: str) -> bool:
        return host in hosts or host.endswith(".localhost") or _is_ip_literal(host)

    def check(path: str, raw_host: str | None, origin: str | None, authorization: str | None) -> Exception | None:
        if raw_host is not None and path not in ANY_HOST_PATHS and not host_allowed(_split_host(raw_host)):
            return Refused(Code.HOST_NOT_ALLOWED, f"Host {raw_host!r} is not allowed without an API key (DNS rebinding "
                           "protection): use 127.0.0.1 or localhost, add the name to MODEL_ORCHESTRATOR_ALLOWED_HOSTS, "
                           "or set MODEL_ORCHESTRATOR_API_KEY")
        if origin is not None:
            normalized = origin.strip().lower().rstrip("/")
            authority = normalized.split("://", 1)[1] if "://" in normalized else None
            same_origin = raw_host is not None and authority == raw_host.strip().lower()
            if not (same_origin or normalized in origins):
                return Refused(Code.ORIGIN_NOT_ALLOWED, f"requests from web pages at {origin!r} are refused without an "
                               "API key: list the origin in MODEL_ORCHESTRATOR_ALLOWED_ORIGINS, or set "
                               "MODEL_ORCHESTRATOR_API_KEY")
        return None

    return check


# ---- the application --------------------------------------------------------------------------------------------
def create_app(orch: Orchestrator) -> web.Application:
    guard = request_guard(orch.settings)
    app = web.Application(middlewares=[errors_and_metrics, guard_middleware(guard)],
                          client_max_size=orch.settings.max_body_mb * 1024 * 1024)
    app[ORCH] = orch
    app[STATUS] = cache = StatusCache({path: functools.partial(build, orch) for path, build in CACHED.items()},
                                      key=functools.partial(views.revision, orch), max_age_s=orch.settings.gpu_sample_s)
    app[TABLE] = Table(cache, guard, functools.partial(count_request, orch))  # what fast_lane.py may answer itself
    sampler = GpuSampler(orch.gpu_view, orch.settings.gpu_sample_s)
    for r in ROUTES:
        app.router.add_route(r.method, r.path, r.handler)
    app[OPENAPI] = build_openapi(ROUTES, version=__version__)
    _add_docs(app)

    async def lifecycle(app: web.Application):
        await orch.start()
        sampler.start()
        yield
        await sampler.stop()
        await orch.close()

    app.cleanup_ctx.append(lifecycle)

    async def end_long_waits(app: web.Application):  # before the server waits for open handlers to finish
        orch.events.close()
        orch.outbound.close()  # Hub calls under way end now, not at their deadline

    app.on_shutdown.append(end_long_waits)
    return app


def _add_docs(app: web.Application) -> None:
    """Swagger UI (bundled by swagger-ui-py, works offline) at /docs, reading /openapi.json."""
    from swagger_ui import api_doc

    app.router.add_get("/docs/openapi.json", openapi_json)  # where the page looks: <url_prefix><config_rel_url>
    api_doc(app, config_rel_url="/openapi.json", url_prefix="/docs", title="model-orchestrator API")



def dump_openapi() -> str:
    return json.dumps(build_openapi(ROUTES, version=__version__), indent=2)
