"""GET /metrics: Prometheus text format.  Open when `auth.metrics_public`, else a token with `admin`."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Request, Response, get
from litestar.handlers import HTTPRouteHandler

from gateway.metrics import GatewayMetrics
from gateway.settings import Settings

__all__ = ["metrics_route"]


def metrics_route(settings: Settings) -> HTTPRouteHandler:
    """The handler, built per app because who may scrape is configuration, not code.  Without `public`, the
    app-wide guard requires the `admin` scope (a token with only `chat` gets 403)."""
    opt: dict[str, Any] = {"scope": "admin", "action": "metrics.scrape"}
    if settings.auth.metrics_public:
        opt["public"] = True

    @get("/metrics", opt=opt, include_in_schema=False)
    async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
        collector: GatewayMetrics = request.app.state["metrics"]
        # Collectors read engine stats and the SQLite store: off the event loop.
        body, content_type = await asyncio.to_thread(collector.render, request.headers.get("accept", ""))
        return Response(body, media_type=content_type, headers={"Cache-Control": "no-store"})

    return metrics
