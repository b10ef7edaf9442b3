"""Errors as the OpenAI API shapes them: {"error": {"code", "message", "type", ...}} with the right status."""

from __future__ import annotations

from aiohttp import web

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None, **details):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.details = details

    def body(self) -> dict:
        err = {"code": self.code, "message": self.message,
               "type": _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")}
        err.update({k: v for k, v in self.details.items() if v is not None})
        return {"error": err}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)
