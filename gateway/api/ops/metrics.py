"""GET /metrics: Prometheus text format.  Who may scrape is `auth.metrics_access`:

    loopback  (default) no token when the TCP peer is 127.0.0.0/8 or ::1 and the request names no forwarded
              client; from anywhere else a token with `admin`, exactly as in `token`
    token     always a token with `admin`
    public    anyone (a firewalled scrape network)

A request that came through a proxy is never local: uvicorn puts the X-Forwarded-For client in the peer's
place when the proxy is on loopback, and a forwarding header left on a loopback peer also asks for a token.
A same-host proxy that forwards /metrics without X-Forwarded-For would make every scrape local: use `token`.
"""

from __future__ import annotations

import asyncio
import ipaddress
from copy import copy
from typing import Any

from litestar import Request, Response, get
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.handlers import HTTPRouteHandler
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

from gateway.auth.guards import Gate
from gateway.core.settings import Settings
from gateway.observability.metrics import GatewayMetrics

__all__ = ["is_local_request", "metrics_route"]

_FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def is_local_request(connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    """The peer is a loopback address and no proxy header names another client.  A unix socket or an
    unparsable peer is not local: fail closed."""
    if connection.client is None or any(h in connection.headers for h in _FORWARDING_HEADERS):
        return False
    try:
        address = ipaddress.ip_address(connection.client.host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 (a dual-stack socket)
    return address.is_loopback


def _local_or_admin(gate: Gate) -> Guard:
    def guard(connection: ASGIConnection[Any, Any, Any, Any], route_handler: BaseRouteHandler) -> None:
        """The handler is marked public so the app-wide guards let a local scrape through without a token;
        any other request gets those same guards, run against the handler without its `public` mark."""
        if is_local_request(connection):
            return
        as_private = copy(route_handler)  # Litestar hands each guard a copy too; the registered one stays
        as_private.opt = {key: value for key, value in route_handler.opt.items() if key != "public"}
        for check in gate.guards:
            check(connection, as_private)

    return guard


def metrics_route(settings: Settings, gate: Gate) -> HTTPRouteHandler:
    """The handler, built per app because who may scrape is configuration, not code.  Where a token is
    needed, the app-wide guard requires the `admin` scope (a token with only `chat` gets 403)."""
    access = settings.auth.metrics_access
    opt: dict[str, Any] = {"scope": "admin", "action": "metrics.scrape"}
    guards: list[Guard] = []
    if access == "public":
        opt["public"] = True
    elif access == "loopback":
        opt["public"] = True
        guards.append(_local_or_admin(gate))

    @get("/metrics", opt=opt, guards=guards, include_in_schema=False)
    async def metrics(
        request: Request[Any, Any, Any], metrics: NamedDependency[GatewayMetrics]
    ) -> Response[bytes]:
        # Collectors read engine stats and the SQLite store: off the event loop.
        body, content_type = await asyncio.to_thread(metrics.render, request.headers.get("accept", ""))
        return Response(body, media_type=content_type, headers={"Cache-Control": "no-store"})

    return metrics
