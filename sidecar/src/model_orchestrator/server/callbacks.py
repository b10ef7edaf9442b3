"""Load callbacks: `POST /models/load` with `wait: false` and a `callback_url` gets the load's outcome POSTed there
when it ends (loaded or failed), retried a few times.

Only to addresses the operator allowed (MODEL_ORCHESTRATOR_CALLBACK_HOSTS): the sidecar must not become an open
relay that POSTs wherever a caller points it. Redirects are not followed for the same reason. `check_url` owns the
rule; `deliver` owns the retries.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import aiohttp

from ..platform.errors import Code, Refused
from .schemas import LoadCallback
from ..core.states import LoadResult

log = logging.getLogger("model_orchestrator.callbacks")

ATTEMPTS = 4  # the first try and three retries
BACKOFF_S = (0.5, 2.0, 5.0)  # waits before the retries
TIMEOUT_S = 10.0
# 4xx answers that mean "not yet": 429 (slow down) and 409, what n8n's webhook-waiting URL answers while the execution
# that will wait has not reached its Wait node yet (a load that ends in milliseconds calls back before that)
RETRIED_4XX = (409, 429)


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def parse_allowed(hosts: str | None) -> list[tuple[str, int | None]]:
    """`n8n:5678,localhost,[::1]:80` -> [("n8n", 5678), ("localhost", None), ("::1", 80)] (no port: any port)."""
    out = []
    for item in (hosts or "").split(","):
        item = item.strip().lower()
        if not item:
            continue
        if item.startswith("["):  # an IPv6 address: [::1] or [::1]:8080
            host, _, rest = item[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = item.rpartition(":") if item.count(":") == 1 else (item, "", "")
        out.append((host, int(port)) if port.isdigit() else (host or item, None))
    return out


def check_url(url: str, allowed_hosts: str | None) -> str:
    """The URL if callbacks may go there, else Refused(callback_not_allowed) saying what to configure."""
    try:
        parts = urlsplit(url)
        port = parts.port or _default_port(parts.scheme)  # ValueError for "h:99999", "h:x"
    except ValueError:  # also an unclosed "[::1"
        raise Refused(Code.INVALID_REQUEST, f"callback_url is not a valid URL (host, port): {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refused(Code.INVALID_REQUEST, f"callback_url must be an http(s) URL, not {url!r}")
    if parts.username or parts.password:
        raise Refused(Code.INVALID_REQUEST, "callback_url must not carry credentials")
    allowed = parse_allowed(allowed_hosts)
    host = parts.hostname.lower()
    if not any(h == host and (p is None or p == port) for h, p in allowed):
        hint = ("no callback hosts are allowed: set MODEL_ORCHESTRATOR_CALLBACK_HOSTS (e.g. n8n:5678)" if not allowed
                else f"allowed: {', '.join(h if p is None else f'{h}:{p}' for h, p in allowed)} "
                     "(MODEL_ORCHESTRATOR_CALLBACK_HOSTS)")
        raise Refused(Code.CALLBACK_NOT_ALLOWED, f"callbacks to {host}:{port} are not allowed; {hint}",
                      callback_host=f"{host}:{port}")
    return url


async def deliver(http: aiohttp.ClientSession, url: str, payload: dict, *, attempts: int = ATTEMPTS,
                  backoff_s: tuple[float, ...] = BACKOFF_S) -> tuple[bool, int, int | None]:
    """POST `payload` as JSON; retry on a connection error, a timeout or a 5xx/409/429 answer.
    Returns (delivered, attempts made, last HTTP status)."""
    status = None
    for attempt in range(1, attempts + 1):
        try:
            async with http.post(url, json=payload, allow_redirects=False,
                                 timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as resp:
                status = resp.status  # the body is never read: whatever the receiver sends costs no memory
                if status < 300:
                    return True, attempt, status
                if status < 500 and status not in RETRIED_4XX:  # the receiver refused it: asking again will not help
                    log.warning("callback to %s refused with %d; not retried", url, status)
                    return False, attempt, status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            status = None
            log.info("callback to %s failed (attempt %d): %s", url, attempt, exc)
        if attempt < attempts:
            await asyncio.sleep(backoff_s[min(attempt - 1, len(backoff_s) - 1)])
    log.warning("callback to %s given up after %d attempts", url, attempts)
    return False, attempts, status


async def after_load(orch, outcome, url: str) -> dict:
    """Wait for the load of `outcome` (orchestrator.LoadOutcome) to end, POST its outcome (schemas.LoadCallback) to
    `url` and publish a `callback` event saying whether it arrived. Returns the payload."""
    model = outcome.model
    error = None
    if outcome.result == LoadResult.ALREADY_LOADED:
        result = "already_loaded"
    else:
        try:
            await outcome.wait()  # a download first, then the load
            result = "loaded"
        except Refused as exc:
            result = "cancelled" if exc.code in (Code.LOAD_CANCELLED, Code.DOWNLOAD_CANCELLED) else "failed"
            error = {"code": exc.code.value, "message": exc.message, **exc.details}
    server = model.server
    payload = LoadCallback(
        model=model.id, result=result, status=model.state,
        load_seconds=model.load_seconds if result == "loaded" else None, pid=server.pid if server else None,
        gpu=model.gpu,
        estimate_mb=round(model.estimate.total_mb, 1) if model.estimate else None, evicted=outcome.evicted,
        error=error).model_dump(mode="json")
    delivered, attempts, status = await deliver(orch.http, url, payload)
    orch.events.publish("callback", model=model.id, url=url, result=result, delivered=delivered, attempts=attempts,
                        status=status)
    return payload
