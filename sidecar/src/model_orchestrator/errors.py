"""Errors as values: every refusal the orchestrator can give, named once in `Code`.

The domain (orchestrator, lifecycle, proxy logic) raises `Refused(Code.X, message, **details)` and knows nothing of
HTTP. The API layer (http_errors.py) holds the one table that maps each code to an HTTP status and shapes the
OpenAI-style body `{"error": {"code", "message", "type", ...}}`.
"""

from __future__ import annotations

import enum


class Code(str, enum.Enum):
    # the request itself is wrong
    INVALID_JSON = "invalid_json"
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_SERVICE = "unknown_service"
    EMBEDDINGS_NOT_ENABLED = "embeddings_not_enabled"
    VISION_NOT_SUPPORTED = "vision_not_supported"
    REMOTE_IMAGE_NOT_ALLOWED = "remote_image_not_allowed"
    INVALID_API_KEY = "invalid_api_key"
    FORBIDDEN_ORIGIN = "forbidden_origin"
    CALLBACK_NOT_ALLOWED = "callback_not_allowed"
    NOT_FOUND = "not_found"
    MODEL_NOT_FOUND = "model_not_found"
    RESERVATION_NOT_FOUND = "reservation_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    BODY_TOO_LARGE = "body_too_large"
    UNREADABLE_MODEL = "unreadable_model"
    # the request is fine but the state says no
    INSUFFICIENT_VRAM = "insufficient_vram"
    TOO_MANY_MODELS = "too_many_models"
    MODEL_BUSY = "model_busy"
    MODEL_FILES_MISSING = "model_files_missing"
    MODEL_NOT_LOADED = "model_not_loaded"
    LOAD_CANCELLED = "load_cancelled"
    OVERLOADED = "overloaded"
    # a model that could not serve
    LOAD_FAILED = "load_failed"
    SPAWN_FAILED = "spawn_failed"
    PROCESS_EXITED = "process_exited"
    LOAD_TIMEOUT = "load_timeout"
    MODEL_UNLOADED = "model_unloaded"
    MODEL_UNLOADING = "model_unloading"
    MODEL_DRAINING = "model_draining"
    SHUTTING_DOWN = "shutting_down"
    MODEL_CRASHED = "model_crashed"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    INTERNAL_ERROR = "internal_error"


class Refused(Exception):
    """A refusal with its code and the details a caller needs to act (missing_mb, evictable, logs, ...).
    `retry_after` (seconds) says the same request may succeed shortly."""

    def __init__(self, code: Code, message: str, *, retry_after: float | None = None, **details):
        super().__init__(message)
        self.code = Code(code)
        self.message = message
        self.retry_after = retry_after
        self.details = {k: v for k, v in details.items() if v is not None}
