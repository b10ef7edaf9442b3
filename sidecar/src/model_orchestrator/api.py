"""What the API can answer: every route, its request and response models, in one table (ROUTES).

/openapi.json and /docs are generated from this table; errors are JSON on every route (OpenAI style); when an API
key is configured every route but /health, /metrics and the docs needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from aiohttp import web
from pydantic import BaseModel, ValidationError

from . import __version__, proxy
from .errors import ApiError
from .gpu import GpuSampler
from .model_files import ModelFilesMissing
from .openapi import build_openapi
from .orchestrator import Orchestrator
from .schemas import (ChatCompletionRequest, CompletionRequest, EmbeddingRequest, EstimateRequest, EstimateResponse,
                      HealthResponse, LoadRequest, LoadResponse, LogsResponse, ModelsResponse, OpenAIModelList,
                      OpenAIResponse, RenewRequest, ReservationList, ReservationOut, ReservationRequest,
                      StatusResponse, UnloadRequest, UnloadResponse)
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
    description: str = ""
    query: tuple[dict, ...] = ()  # OpenAPI query parameters
    statuses: tuple[tuple[int, str], ...] = ()  # answers beyond the common errors (openapi._ERRORS)


async def _body(request: web.Request, model: type[BaseModel]):
    """Validate a JSON body with the route's model; a bad body is a 400 naming the field."""
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested deeper than json can parse
        raise ApiError(400, "invalid_json", "the request body is not valid JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [{"field": ".".join(str(p) for p in e["loc"]) or "(body)", "problem": e["msg"]} for e in exc.errors()]
        first = problems[0]
        raise ApiError(400, "invalid_request", f"{first['field']}: {first['problem']}", problems=problems) from None


def _json(model: type[BaseModel], data: dict, status: int = 200) -> web.Response:
    return web.Response(body=_serialised(model, data), status=status, content_type="application/json")


def _serialised(model: type[BaseModel], data: dict) -> bytes:
    # validate what we answer with the documented model: the OpenAPI document cannot drift from the answers
    return model.model_validate(data).model_dump_json().encode()


async def _cached(request: web.Request, name: str, build: Callable[[], Awaitable[bytes]]) -> web.Response:
    """An answer of the status cache (status_cache.py): built and serialised once per state, then served as bytes."""
    key = f"{name}?{request.query_string}" if request.query_string else name
    return web.Response(body=await request.app[STATUS].get(key, build), content_type="application/json")


# ---- handlers ---------------------------------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    orch = request.app[ORCH]

    async def build() -> bytes:
        return _serialised(HealthResponse, orch.health())

    return await _cached(request, "health", build)


async def metrics(request: web.Request) -> web.Response:
    m = request.app[ORCH].metrics
    frozen = m.freeze()  # on the event loop, where the state changes: what this scrape shows, copied
    body = await asyncio.to_thread(m.render, frozen)  # formatting off the loop, over values nobody mutates
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def models_status(request: web.Request) -> web.Response:
    orch = request.app[ORCH]

    async def build() -> bytes:
        return _serialised(StatusResponse, orch.status_view(orch.gpu.latest()))  # the sampler's GPU readings

    return await _cached(request, "status", build)


async def models_list(request: web.Request) -> web.Response:
    orch = request.app[ORCH]

    async def build() -> bytes:
        return _serialised(ModelsResponse, await asyncio.to_thread(orch.models))  # checks the HF cache on disk

    return await _cached(request, "models", build)


async def models_load(request: web.Request) -> web.Response:
    req = await _body(request, LoadRequest)
    orch = request.app[ORCH]
    if req.service != "llama-cpp" and orch.registry.lookup(req.model) is None:
        # the guide's pattern for other GPU services: "load wan2.1-14b in comfyui" reserves its memory (making room)
        if req.vram_mb is None:
            raise ApiError(400, "unknown_service", f"{req.model!r} of service {req.service!r} is not run by this "
                           "orchestrator: pass vram_mb to reserve GPU memory for it (it then counts in admission)")
        r = await orch.reserve(req.service, req.vram_mb, ttl_s=req.ttl_s, model=req.model,
                               priority=req.priority if req.priority is not None else 50,
                               allow_eviction=req.allow_eviction, force=req.force)
        return _json(LoadResponse, {"model": req.model, "status": "reserved", "result": "reserved",
                                    "reservation": r.to_dict()})
    kwargs = dict(priority=req.priority, service=req.service, timeout_s=req.timeout_s,
                  allow_eviction=req.allow_eviction, force=req.force)
    if not req.wait:
        slot = orch.load_in_background(req.model, **kwargs)
        await asyncio.sleep(0)  # let the load task take the first step so the state reads "loading"
        return _json(LoadResponse, {"model": slot.id, "status": slot.state, "result": "loading"}, status=202)
    evicted_before = _evictions(orch)
    slot, result = await orch.load(req.model, **kwargs)
    server = slot.server
    return _json(LoadResponse, {"model": slot.id, "status": slot.state, "result": result,
                                "load_seconds": slot.load_seconds, "pid": server.pid if server else None,
                                "port": server.port if server else None, "gpu": slot.gpu,
                                "estimate_mb": round(slot.estimate.total_mb, 1) if slot.estimate else None,
                                "evicted": sorted(m for m, n in _evictions(orch).items() if n > evicted_before.get(m, 0))})


def _evictions(orch) -> dict[str, float]:
    return {m: orch.metrics.unloads.labels(m, "evicted")._value.get() for m in orch.slots}


async def models_unload(request: web.Request) -> web.Response:
    req = await _body(request, UnloadRequest)
    orch = request.app[ORCH]
    if orch.registry.lookup(req.model) is None:
        # the guide unloads "wan2.1-14b": not ours to stop, but its reservation is released so admission forgets it
        released = orch.reservations.release_matching(req.model)
        if released:
            return _json(UnloadResponse, {"model": req.model, "status": "released", "result": "released",
                                          "released": [r.to_dict() for r in released]})
        raise ApiError(404, "model_not_found", f"unknown model {req.model!r}: not in the registry and no reservation "
                       f"under that name; known models: {', '.join(sorted(orch.slots))} (GET /models); "
                       "stop other services' models in those services")
    if req.service not in (None, "llama-cpp"):
        raise ApiError(400, "unknown_service", f"service {req.service!r} is not run by this orchestrator; use 'llama-cpp'")
    slot, result = await orch.unload(req.model, force=req.force, drain_timeout_s=req.drain_timeout_s)
    return _json(UnloadResponse, {"model": slot.id, "status": slot.state, "result": result})


async def models_estimate(request: web.Request) -> web.Response:
    req = await _body(request, EstimateRequest)
    orch = request.app[ORCH]
    slot = orch.slot(req.model)
    try:
        est = await orch.estimate(slot.spec, context_size=req.context_size, cache_type=req.cache_type,
                                  n_gpu_layers=req.n_gpu_layers)
    except ModelFilesMissing as exc:
        raise ApiError(409, "model_files_missing", str(exc), model=slot.id) from None
    except (ValueError, OSError) as exc:
        raise ApiError(422, "unreadable_model", f"cannot read the GGUF header of {slot.id}: {exc}", model=slot.id) from None
    fit = await orch.check_fit(slot.spec, est)
    return _json(EstimateResponse, {"model": slot.id, "context_size": req.context_size or slot.spec.context_size,
                                    "cache_type": est.cache_type, "estimate": est.to_dict(), "fit": fit})


async def reservations_list(request: web.Request) -> web.Response:
    return _json(ReservationList, {"reservations": [r.to_dict() for r in request.app[ORCH].reservations.active()]})


async def reservations_create(request: web.Request) -> web.Response:
    req = await _body(request, ReservationRequest)
    r = await request.app[ORCH].reserve(req.service, req.vram_mb, ttl_s=req.ttl_s, gpu=req.gpu, model=req.model,
                                        priority=req.priority, allow_eviction=req.allow_eviction, force=req.force)
    return _json(ReservationOut, r.to_dict(), status=201)


def _reservation_id(request: web.Request) -> str:
    rid = request.match_info["id"]
    if not rid.isalnum() or len(rid) > 64:
        raise ApiError(400, "invalid_request", "a reservation id is letters and digits")
    return rid


async def reservations_renew(request: web.Request) -> web.Response:
    rid = _reservation_id(request)
    req = await _body(request, RenewRequest) if request.can_read_body else RenewRequest()
    r = request.app[ORCH].reservations.renew(rid, req.ttl_s)
    if r is None:
        raise ApiError(404, "reservation_not_found", f"no reservation {rid} (expired or released)")
    return _json(ReservationOut, r.to_dict())


async def reservations_release(request: web.Request) -> web.Response:
    rid = _reservation_id(request)
    r = request.app[ORCH].reservations.release(rid)
    if r is None:
        raise ApiError(404, "reservation_not_found", f"no reservation {rid} (expired or released)")
    return _json(ReservationOut, r.to_dict())


async def model_logs(request: web.Request) -> web.Response:
    slot = request.app[ORCH].slot(request.match_info["model"])
    try:
        n = max(1, min(int(request.query.get("lines", "100")), 10000))
    except ValueError:
        raise ApiError(400, "invalid_request", "lines must be an integer") from None
    server = slot.server
    lines = server.last_logs(n) if server else (slot.last_error or {}).get("logs", [])[-n:]
    return _json(LogsResponse, {"model": slot.id, "pid": server.pid if server else None, "lines": lines})


async def v1_models(request: web.Request) -> web.Response:
    return _json(OpenAIModelList, proxy.list_models(request.app[ORCH]))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await proxy.forward(request, request.app[ORCH], "chat_completions")


async def completions(request: web.Request) -> web.StreamResponse:
    return await proxy.forward(request, request.app[ORCH], "completions")


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await proxy.forward(request, request.app[ORCH], "embeddings")


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


_PROXY_STATUSES = ((429, "overloaded: too many requests waiting for this model (MODEL_ORCHESTRATOR_MAX_QUEUE); "
                           "retry after Retry-After seconds"),
                   (502, "llama-server crashed or the connection to it broke during the request"),
                   (504, "upstream_timeout: llama-server sent nothing for MODEL_ORCHESTRATOR_UPSTREAM_IDLE_TIMEOUT_S"))

ROUTES: list[Route] = [
    Route("GET", "/health", health, "Liveness of the orchestrator", response=HealthResponse, auth=False, tag="service"),
    Route("GET", "/metrics", metrics, "Prometheus metrics (GPU, models, requests, tokens)", auth=False, tag="service"),
    Route("GET", "/models/status", models_status, "GPU memory and the models that are not unloaded", response=StatusResponse,
          description="The guide's shape (total_mb, used_mb, free_mb, utilization_percent, loaded_models) plus "
                      "per-GPU details. In CPU mode the memory fields are null and `note` says why."),
    Route("GET", "/models", models_list, "The model registry with each model's state (for dropdowns)", response=ModelsResponse),
    Route("POST", "/models/load", models_load, "Load a model (joins a load under way)", request=LoadRequest,
          response=LoadResponse, description="Answers when llama-server is ready, or 202 at once with wait=false. "
          "A model that cannot start answers 503 with llama-server's last log lines.",
          statuses=((202, "wait=false: the load started"),)),
    Route("POST", "/models/unload", models_unload, "Unload a model", request=UnloadRequest, response=UnloadResponse,
          description="Without force, waits up to drain_timeout_s for requests in flight (new ones get 503 + "
          "Retry-After meanwhile) and then refuses with 409, changing nothing. With force, stops llama-server at once; "
          "requests in flight end with a model_unloaded error. An unload during a load cancels it."),
    Route("POST", "/models/estimate", models_estimate, "Predicted GPU memory of a model's llama-server, and whether it fits now",
          request=EstimateRequest, response=EstimateResponse,
          description="From the GGUF header only: weights on the GPU, KV cache, compute buffer, projector, CUDA overhead.",
          statuses=((422, "the model file is not a readable GGUF"),)),
    Route("GET", "/reservations", reservations_list, "Memory reserved by other GPU services", response=ReservationList,
          tag="reservations"),
    Route("POST", "/reservations", reservations_create, "Reserve GPU memory for another service (WhisperX, ComfyUI...)",
          request=ReservationRequest, response=ReservationOut, status=201, tag="reservations",
          description="Counts in admission at once; may evict models of lower priority (or equal, with allow_eviction) "
                      "to make room; refused with 409 insufficient_vram otherwise. Expires after ttl_s unless renewed."),
    Route("POST", "/reservations/{id}/renew", reservations_renew, "Extend a reservation's lifetime", request=RenewRequest,
          response=ReservationOut, tag="reservations"),
    Route("DELETE", "/reservations/{id}", reservations_release, "Release a reservation", response=ReservationOut,
          tag="reservations"),
    Route("GET", "/models/{model}/logs", model_logs, "The last lines llama-server printed (?lines=N)", response=LogsResponse,
          query=({"name": "lines", "in": "query", "required": False, "description": "how many lines (1..10000)",
                  "schema": {"type": "integer", "default": 100}},)),
    Route("GET", "/v1/models", v1_models, "OpenAI: list models", response=OpenAIModelList, tag="openai"),
    Route("POST", "/v1/chat/completions", chat_completions, "OpenAI: chat (images, tools, streaming passed through)",
          request=ChatCompletionRequest, response=OpenAIResponse, tag="openai", statuses=_PROXY_STATUSES, stream=True,
          description="Routed by `model` to its llama-server, which is loaded on demand when the registry allows; "
          "requests that arrive during a load wait for it."),
    Route("POST", "/v1/completions", completions, "OpenAI: text completion", request=CompletionRequest,
          response=OpenAIResponse, tag="openai", statuses=_PROXY_STATUSES, stream=True),
    Route("POST", "/v1/embeddings", embeddings, "OpenAI: embeddings (the model needs --embeddings in extra_args)",
          request=EmbeddingRequest, response=OpenAIResponse, tag="openai", statuses=_PROXY_STATUSES),
    Route("GET", "/openapi.json", openapi_json, "This API's OpenAPI document", auth=False, tag="service"),
]

PUBLIC_PREFIXES = ("/docs",)  # Swagger UI's page and assets: the page itself holds the "Authorize" button


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
    except ApiError as err:
        status = err.status
        return err.response()
    except web.HTTPException as exc:
        status = exc.status
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status, "http_error")
        message = {404: f"no route {request.method} {request.path} (GET /docs lists them)",
                   405: f"{request.method} is not allowed on {request.path}",
                   413: f"the body is larger than {request.app[ORCH].settings.max_body_mb} MB "
                        "(MODEL_ORCHESTRATOR_MAX_BODY_MB)"}.get(exc.status, exc.reason)
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None  # 405 lists the methods (RFC 9110)
        return ApiError(exc.status, code, message, headers=allow).response()
    except proxy.ClientGone:  # the client hung up mid-answer: counted, nothing to answer or to log
        status = proxy.CLIENT_GONE
        return request.get(proxy.PROXIED_STREAM) or web.Response(status=proxy.CLIENT_GONE)
    except asyncio.CancelledError:
        status = proxy.CLIENT_GONE  # the client went away
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return ApiError(500, "internal_error", "internal error; the sidecar's log has the details").response()
    finally:
        orch = request.app[ORCH]
        route = _route_label(request)
        m = orch.metrics
        m.child(m.http_requests, route, request.method, str(status)).inc()
        m.child(m.http_duration, route, request.method).observe(time.perf_counter() - t0)


def auth_middleware(api_key: str, public_paths: set[str]):
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in public_paths or request.path.startswith(PUBLIC_PREFIXES):
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):  # constant time: no timing oracle on the key
            raise ApiError(401, "invalid_api_key", "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return check


# ---- the application --------------------------------------------------------------------------------------------
def create_app(orch: Orchestrator) -> web.Application:
    middlewares = [errors_and_metrics]
    if orch.settings.api_key:
        middlewares.append(auth_middleware(orch.settings.api_key, {r.path for r in ROUTES if not r.auth}))
    app = web.Application(middlewares=middlewares, client_max_size=orch.settings.max_body_mb * 1024 * 1024)
    app[ORCH] = orch
    app[STATUS] = StatusCache(orch, max_age_s=orch.settings.gpu_sample_s)
    sampler = GpuSampler(orch.gpu, orch.settings.gpu_sample_s)
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
    return app


def _add_docs(app: web.Application) -> None:
    """Swagger UI (bundled by swagger-ui-py, works offline) at /docs, reading /openapi.json."""
    from swagger_ui import api_doc

    app.router.add_get("/docs/openapi.json", openapi_json)  # where the page looks: <url_prefix><config_rel_url>
    api_doc(app, config_rel_url="/openapi.json", url_prefix="/docs", title="model-orchestrator API")



def dump_openapi() -> str:
    return json.dumps(build_openapi(ROUTES, version=__version__), indent=2)
