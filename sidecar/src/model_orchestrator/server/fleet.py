"""Who the other sidecars are: MODEL_ORCHESTRATOR_FLEET resolved to base URLs (GET /fleet).

Discovery only. Each sidecar stays the one authority for its own GPUs; clients (the n8n nodes, `status`) ask every
member themselves. In Kubernetes the setting names the headless Service, whose DNS name resolves to the address of
every ready sidecar pod, so one URL in a client finds all of them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field

RESOLVE_TIMEOUT_S = 3.0


@dataclass
class Fleet:
    members: list[str] = field(default_factory=list)  # base URLs, sorted; empty: this sidecar alone
    errors: list[str] = field(default_factory=list)  # entries that did not resolve, with why


def entries(spec: str | None, default_port: int) -> list[tuple[str, int]]:
    """"a.svc:8000, 10.0.0.5, [fd00::1]:9000" -> [(host, port)]; a missing port is this sidecar's."""
    out = []
    for raw in (spec or "").replace(" ", ",").split(","):
        raw = raw.strip().removeprefix("http://").rstrip("/")
        if not raw:
            continue
        host, port = raw, default_port
        if raw.startswith("["):  # [v6]:port
            host, _, rest = raw[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else default_port
        elif raw.count(":") == 1:
            host, p = raw.split(":")
            port = int(p)
        out.append((host, port))
    return out


def base_url(address: str, port: int) -> str:
    try:
        v6 = ipaddress.ip_address(address).version == 6
    except ValueError:
        v6 = False
    return f"http://[{address}]:{port}" if v6 else f"http://{address}:{port}"


async def resolve(spec: str | None, default_port: int) -> Fleet:
    """Every address of every entry, as base URLs (a DNS name of a headless Service gives one per ready pod)."""
    loop = asyncio.get_running_loop()
    fleet, seen = Fleet(), set()
    for host, port in entries(spec, default_port):
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as exc:
            fleet.errors.append(f"{host}: {exc or 'no answer from DNS within ' + str(RESOLVE_TIMEOUT_S) + ' s'}")
            continue
        v4 = [i for i in infos if i[0] == socket.AF_INET]
        for info in v4 or infos:  # a dual-stack name: its IPv4 addresses (a sidecar bound to 0.0.0.0 has no v6)
            url = base_url(info[4][0], port)
            if url not in seen:
                seen.add(url)
                fleet.members.append(url)
    fleet.members.sort()
    return fleet
