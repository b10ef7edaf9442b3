"""Which remote media URLs reach llama-server: none. llama-server downloads any media reference that starts with
"http" itself, from wherever it points (a blind SSRF from the model's process, and its error text told open ports
from closed ones), and b11434 has no flag to turn that off. So every proxied body goes through `localize` first.

What counts as a media reference is what llama-server reads one from, anywhere in the body (chat messages, the
parts of an embeddings `input`, whatever a later version adds): the value of a key in MEDIA_KEYS, either a string or
an object whose `url` or `data` is one. A remote one is refused unless its host is listed in
MODEL_ORCHESTRATOR_IMAGE_URL_HOSTS; allowed ones are fetched by the sidecar (no redirects, time- and size-bounded)
and passed on as data URLs. A failed fetch answers the same whatever went wrong (refused, silent, not a 200), so the
answer tells a caller nothing about a port; the sidecar's log has the reason.
"""

from __future__ import annotations

import base64
import logging
from typing import TYPE_CHECKING

import aiohttp
import orjson
import yarl

from ..platform.errors import Code, Refused

if TYPE_CHECKING:
    from ..core.orchestrator import Orchestrator

log = logging.getLogger("model_orchestrator.media_urls")

# the content parts llama-server turns into media (server-common.cpp, oaicompat_content_load_media; the Responses
# API's input_image arrives as image_url)
MEDIA_KEYS = ("image_url", "input_audio", "input_video", "video_url")
_URL_KEYS = ("url", "data")  # inside a part's object: llama-server reads `data`, else `url`
MAX_REMOTE = 16  # remote references one request may carry (each fetched whole, up to IMAGE_URL_MAX_MB, in memory)
# a body without these bytes holds no media key (a JSON escape such as \u0069mage_url is looked at too)
_HINTS = tuple(f'"{k}"'.encode() for k in MEDIA_KEYS) + (b"\\u",)


async def localize(orch: "Orchestrator", raw: bytes, body: dict) -> bytes:
    """The body to send upstream: `raw` itself when it holds no remote media reference, else re-encoded with every
    allowed one replaced by its data URL. Raises Refused (image_url_not_allowed, image_fetch_failed,
    image_too_large) and changes nothing else."""
    if not any(h in raw for h in _HINTS):
        return raw
    found: list[tuple[dict, str, str]] = []  # (object, key, url) for each remote reference
    _collect(body, found)
    if not found:
        return raw
    for _, _, url in found:  # refuse before fetching anything
        _check_host(orch, url)
    if len(found) > MAX_REMOTE:
        raise Refused(Code.INVALID_REQUEST, f"{len(found)} remote media URLs in one request; at most {MAX_REMOTE} are "
                      "fetched: send the others as data URLs")
    for holder, key, url in found:
        holder[key] = await _fetch(orch, url)
    return orjson.dumps(body)


def _remote(value) -> bool:
    return isinstance(value, str) and value[:4].lower() == "http"


def _collect(node, found: list) -> None:
    stack = [node]
    while stack:  # iterative: orjson parses deeper than Python recurses
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if key in MEDIA_KEYS:
                if _remote(value):
                    found.append((node, key, value))
                elif isinstance(value, dict):
                    found.extend((value, k, value[k]) for k in _URL_KEYS if _remote(value.get(k)))
            if isinstance(value, (dict, list)):
                stack.append(value)


def _allowed_hosts(orch: "Orchestrator") -> set[str]:
    return {h.strip().lower() for h in orch.settings.image_url_hosts.split(",") if h.strip()}


def _host(url: str) -> str:
    if not url.lower().startswith(("http://", "https://")):
        return ""
    try:
        return (yarl.URL(url).host or "").lower()
    except ValueError:
        return ""


def _check_host(orch: "Orchestrator", url: str) -> None:
    host = _host(url)
    if not host or host not in _allowed_hosts(orch):
        raise Refused(Code.IMAGE_URL_NOT_ALLOWED, f"remote media URLs are not fetched from {host or url[:40]!r}: send "
                      "the image, audio or video as a data URL (data:image/png;base64,...), or add the host to "
                      "MODEL_ORCHESTRATOR_IMAGE_URL_HOSTS", host=host or None)


async def _fetch(orch: "Orchestrator", url: str) -> str:
    settings = orch.settings
    limit = int(settings.image_url_max_mb * 1024 * 1024)
    too_large = Refused(Code.IMAGE_TOO_LARGE, f"{url} is larger than {settings.image_url_max_mb:g} MB "
                        "(MODEL_ORCHESTRATOR_IMAGE_URL_MAX_MB)", url=url)
    try:
        async with orch.http.get(url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=10)) as r:
            if r.status != 200:
                raise _Failed(f"answered {r.status}")
            if r.content_length is not None and r.content_length > limit:
                raise too_large
            data = await r.content.read(limit + 1)
            if len(data) > limit:
                raise too_large
            ctype = r.content_type if r.content_type.startswith(("image/", "video/", "audio/")) else "image/png"
    except (_Failed, aiohttp.ClientError, TimeoutError, ValueError) as exc:
        log.info("fetching %s failed: %s %s", url, exc.__class__.__name__, exc)
        raise Refused(Code.IMAGE_FETCH_FAILED, f"could not fetch {url} (no image with status 200 came back within "
                      "10 s; the sidecar's log says why)", url=url) from None
    return f"data:{ctype};base64,{base64.b64encode(data).decode()}"


class _Failed(Exception):
    pass
