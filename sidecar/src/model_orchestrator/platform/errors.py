"""Every refusal the orchestrator can give, named once in `Code`, and raised as an `errors.Refused` exception.

The domain (orchestrator, lifecycle, proxy logic) raises `Refused(Code.X, message, **details)` and knows nothing of
HTTP. The API layer (http_errors.py) holds the one table that maps each code to an HTTP status and shapes the
OpenAI-style body `{"error": {"code", "message", "type", ...}}`. Two kinds of refusal that callers catch by kind live
here too, below everything that raises them: `ModelFilesMissing` (model_files.py) and its `HubError` (hub.py,
outbound.py).
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
    UNKNOWN_ADAPTER = "unknown_adapter"
    IMAGE_URL_NOT_ALLOWED = "image_url_not_allowed"
    IMAGE_FETCH_FAILED = "image_fetch_failed"
    IMAGE_TOO_LARGE = "image_too_large"
    REJECTED_BY_LLAMA_SERVER = "rejected_by_llama_server"
    INVALID_API_KEY = "invalid_api_key"
    HOST_NOT_ALLOWED = "host_not_allowed"
    ORIGIN_NOT_ALLOWED = "origin_not_allowed"
    UNSUPPORTED_CHARSET = "unsupported_charset"
    BODY_TIMEOUT = "body_timeout"
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
    TOO_MANY_RESERVATIONS = "too_many_reservations"
    MODEL_BUSY = "model_busy"
    MODEL_FILES_MISSING = "model_files_missing"
    MODEL_NOT_LOADED = "model_not_loaded"
    LOAD_CANCELLED = "load_cancelled"
    # the queue in front of a model (dispatcher.py)
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    # the Hugging Face Hub could not give a model's files or header (hub.py)
    HUB_ACCESS_DENIED = "hub_access_denied"
    HUB_BAD_FILE = "hub_bad_file"
    HUB_BAD_RESPONSE = "hub_bad_response"
    HUB_CHECKSUM_MISMATCH = "hub_checksum_mismatch"
    HUB_FILE_NOT_FOUND = "hub_file_not_found"
    HUB_GATED_REPO = "hub_gated_repo"
    HUB_OFFLINE = "hub_offline"
    HUB_REPO_NOT_FOUND = "hub_repo_not_found"
    HUB_REVISION_NOT_FOUND = "hub_revision_not_found"
    HUB_UNAVAILABLE = "hub_unavailable"
    HUB_UNREACHABLE = "hub_unreachable"
    HUB_TIMEOUT = "hub_timeout"
    INSUFFICIENT_DISK = "insufficient_disk"
    DOWNLOAD_CANCELLED = "download_cancelled"
    DOWNLOAD_FAILED = "download_failed"
    # a model that could not serve
    LOAD_FAILED = "load_failed"
    SPAWN_FAILED = "spawn_failed"
    PROCESS_EXITED = "process_exited"
    LOAD_TIMEOUT = "load_timeout"
    MODEL_UNLOADED = "model_unloaded"
    SHUTTING_DOWN = "shutting_down"
    HEALTH_TIMEOUT = "health_timeout"
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


def shutting_down() -> Refused:
    """What every operation refused because the orchestrator is closing raises."""
    return Refused(Code.SHUTTING_DOWN, "the orchestrator is shutting down", retry_after=5)


class ModelFilesMissing(Refused):
    """A model's files are not on disk; the message says how to get them. Nothing was spawned."""

    def __init__(self, message: str, *, code: Code = Code.MODEL_FILES_MISSING, **details):
        super().__init__(code, message, **details)


class HubError(ModelFilesMissing):
    """The Hub could not give a model's files or header. One line: what is wrong and what fixes it."""

    def __init__(self, code: Code, message: str):
        super().__init__(message, code=code)
