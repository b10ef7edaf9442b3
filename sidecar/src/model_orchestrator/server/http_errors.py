"""The one table that maps the orchestrator's error codes (errors.Code) to HTTP statuses, and the JSON shape of
every error answer: OpenAI style, `{"error": {"code", "message", "type", ...details}}`."""

from __future__ import annotations

import math

from aiohttp import web
from pydantic import ValidationError

from ..platform.errors import Code, Refused

STATUS: dict[Code, int] = {
    Code.INVALID_JSON: 400,
    Code.INVALID_REQUEST: 400,
    Code.UNKNOWN_SERVICE: 400,
    Code.EMBEDDINGS_NOT_ENABLED: 400,
    Code.VISION_NOT_SUPPORTED: 400,
    Code.UNKNOWN_ADAPTER: 400,
    Code.IMAGE_URL_NOT_ALLOWED: 400,
    Code.IMAGE_FETCH_FAILED: 400,
    Code.IMAGE_TOO_LARGE: 400,
    Code.REJECTED_BY_LLAMA_SERVER: 400,
    Code.INVALID_API_KEY: 401,
    Code.HOST_NOT_ALLOWED: 403,
    Code.ORIGIN_NOT_ALLOWED: 403,
    Code.BODY_TIMEOUT: 408,
    Code.UNSUPPORTED_CHARSET: 415,
    Code.CALLBACK_NOT_ALLOWED: 403,
    Code.NOT_FOUND: 404,
    Code.MODEL_NOT_FOUND: 404,
    Code.RESERVATION_NOT_FOUND: 404,
    Code.METHOD_NOT_ALLOWED: 405,
    Code.BODY_TOO_LARGE: 413,
    Code.UNREADABLE_MODEL: 422,
    Code.INSUFFICIENT_VRAM: 409,
    Code.TOO_MANY_MODELS: 409,
    Code.TOO_MANY_RESERVATIONS: 409,
    Code.MODEL_BUSY: 409,
    Code.MODEL_FILES_MISSING: 409,
    Code.MODEL_NOT_LOADED: 409,
    Code.LOAD_CANCELLED: 409,
    Code.INTERNAL_ERROR: 500,
    Code.MODEL_CRASHED: 502,
    Code.UPSTREAM_ERROR: 502,
    Code.LOAD_FAILED: 503,
    Code.SPAWN_FAILED: 503,
    Code.PROCESS_EXITED: 503,
    Code.HEALTH_TIMEOUT: 503,
    Code.LOAD_TIMEOUT: 503,
    Code.MODEL_UNLOADED: 503,
    Code.QUEUE_FULL: 503,
    Code.QUEUE_TIMEOUT: 503,
    Code.SHUTTING_DOWN: 503,
    Code.UPSTREAM_TIMEOUT: 504,
    Code.HUB_ACCESS_DENIED: 502,
    Code.HUB_BAD_FILE: 502,
    Code.HUB_BAD_RESPONSE: 502,
    Code.HUB_CHECKSUM_MISMATCH: 502,
    Code.HUB_FILE_NOT_FOUND: 502,
    Code.HUB_GATED_REPO: 502,
    Code.HUB_OFFLINE: 503,
    Code.HUB_REPO_NOT_FOUND: 502,
    Code.HUB_REVISION_NOT_FOUND: 502,
    Code.HUB_UNAVAILABLE: 503,
    Code.HUB_UNREACHABLE: 503,
    Code.HUB_TIMEOUT: 504,
    Code.INSUFFICIENT_DISK: 507,
    Code.DOWNLOAD_CANCELLED: 409,
    Code.DOWNLOAD_FAILED: 500,
}

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          408: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
          415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}


class HttpRefused(Refused):
    """A refusal of the HTTP layer itself that needs response headers (WWW-Authenticate, Connection: close)."""

    def __init__(self, code: Code, message: str, *, headers: dict[str, str], **details):
        super().__init__(code, message, **details)
        self.headers = headers


def invalid_request(exc: ValidationError) -> Refused:
    """A body the request's schema refused: 400 naming the first field that is wrong, every problem in `problems`."""
    problems = [{"field": ".".join(str(p) for p in e["loc"]) or "(body)", "problem": e["msg"]} for e in exc.errors()]
    return Refused(Code.INVALID_REQUEST, f"{problems[0]['field']}: {problems[0]['problem']}", problems=problems)


def error_body(status: int, code: str, message: str, details: dict | None = None) -> dict:
    err = {"code": code, "message": message,
           "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")}
    err.update({k: v for k, v in (details or {}).items() if v is not None})
    return {"error": err}


def refusal_body(err: Refused) -> dict:
    return error_body(STATUS[err.code], err.code.value, err.message, err.details)


def refusal_response(err: Refused, headers: dict[str, str] | None = None) -> web.Response:
    headers = {**getattr(err, "headers", {}), **(headers or {})}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    return web.json_response(refusal_body(err), status=STATUS[err.code], headers=headers)
