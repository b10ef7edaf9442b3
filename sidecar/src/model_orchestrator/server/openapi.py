"""/openapi.json, generated from the route table in api.py and the pydantic models in schemas.py.

There is no hand-kept copy of the schema: a route's request model is the class that validates its body.
"""

from __future__ import annotations

import re

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ..files.registry import MODEL_ID_PATTERN
from .schemas import ErrorResponse

# what the handlers accept in the URL: a model id or alias, a reservation id (letters and digits)
_PATH_PARAMS = {"model": {"type": "string", "pattern": MODEL_ID_PATTERN},
                "id": {"type": "string", "pattern": r"^[A-Za-z0-9]{1,64}$"}}

_ERRORS = {"400": "invalid request (bad JSON, wrong types, unknown fields)", "401": "missing or wrong API key",
           "404": "unknown model or route", "409": "conflict with the model's state (busy, cancelled, files missing)",
           "413": "body too large", "503": "not now: a load failed, the queue is full or timed out, shutting down",
           "403": "without an API key: refused for a web page's Origin or a Host name that is not allowed"}
_BODY_ERRORS = {"408": "the request body did not arrive in time (MODEL_ORCHESTRATOR_IDLE_TIMEOUT_S)",
                "415": "the body's declared charset is not UTF-8"}


# pydantic writes a bound it cannot attach to a plain type (a constrained `int | None` behind a validator) under
# its Python name, which JSON Schema ignores: a fuzzer would then send context_size 0 as valid
_BOUND_NAMES = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def json_schema_bounds(node):
    """Rename pydantic's ge/le/gt/lt to JSON Schema's keywords throughout a schema (in place)."""
    if isinstance(node, dict):
        if node.get("type") in ("integer", "number"):
            for py, js in _BOUND_NAMES.items():
                if py in node:
                    node[js] = node.pop(py)
        for v in node.values():
            json_schema_bounds(v)
    elif isinstance(node, list):
        for v in node:
            json_schema_bounds(v)
    return node


def build_openapi(routes, *, version: str, title: str = "model-orchestrator") -> dict:
    models: set[type[BaseModel]] = {ErrorResponse}
    for r in routes:
        models.update(m for m in (r.request, r.response, getattr(r, "callback", None)) if m is not None)
    _, defs = models_json_schema([(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
                                 ref_template="#/components/schemas/{model}")
    paths: dict[str, dict] = {}
    for r in routes:
        op: dict = {"summary": r.summary, "operationId": r.handler.__name__, "tags": [r.tag],
                    "responses": {str(r.status): _content(r.response, r.stream, getattr(r, "events", False))}}
        if r.description:
            op["description"] = r.description
        if getattr(r, "response_headers", ()):
            op["responses"][str(r.status)]["headers"] = {name: {"description": text, "schema": {"type": "integer"}}
                                                         for name, text in r.response_headers}
        params = [{"name": name, "in": "path", "required": True, "schema": _PATH_PARAMS[name]}
                  for name in re.findall(r"{(\w+)}", r.path)] + list(r.query)
        if params:
            op["parameters"] = params
        for code, text in r.statuses:
            op["responses"][str(code)] = {"description": text, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        if r.request is not None:
            # a body whose fields are all optional may be left out (POST /reservations/{id}/renew)
            op["requestBody"] = {"required": bool(r.request.model_json_schema().get("required")),
                                 "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{r.request.__name__}"}}}}
        for code, text in (_ERRORS | (_BODY_ERRORS if r.request is not None else {})).items():
            if code != "401" or r.auth:
                op["responses"].setdefault(code, {"description": text, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
        if getattr(r, "callback", None) is not None:
            op["callbacks"] = {"outcome": {"{$request.body#/callback_url}": {"post": {
                "summary": "The outcome, POSTed when the work ends (retried on errors and 5xx answers)",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{r.callback.__name__}"}}}},
                "responses": {"2XX": {"description": "received"}}}}}}
        if not r.auth:
            op["security"] = []
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "Runs llama-server processes for n8n and manages GPU memory: load, unload, status, "
                                "and an OpenAI-compatible proxy routed by model."},
        "paths": paths,
        "components": {"schemas": json_schema_bounds(defs.get("$defs", {})),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }


def _content(model: type[BaseModel] | None, stream: bool, events: bool = False) -> dict:
    if events and model is not None:  # a stream of server-sent events only (GET /models/events)
        # OpenAPI 3.1 reads an event stream's `schema` as one event (3.2 calls it itemSchema): its `data` is JSON
        return {"description": "a server-sent event stream; each event's `data` is this object as JSON",
                "content": {"text/event-stream": {"schema": {
                    "type": "object", "properties": {
                        "data": {"type": "string", "contentMediaType": "application/json",
                                 "contentSchema": {"$ref": f"#/components/schemas/{model.__name__}"}},
                        "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}}}}
    if model is None:
        return {"description": "text", "content": {"text/plain": {"schema": {"type": "string"}}}}
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    if stream:
        # OpenAPI 3.1 reads an event stream's `schema` as one event (3.2 calls it itemSchema)
        content["text/event-stream"] = {"schema": {
            "type": "object", "description": "one SSE event when stream is true: `data` is a JSON chunk as llama-server "
            "wrote it, `[DONE]` at the end, or {\"error\": ...} if the model crashed or was unloaded mid-stream",
            "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                           "retry": {"type": "integer"}}}}
    return {"description": "OK", "content": content}
