"""An ASGI wrapper that sets the TCP peer the app sees: Litestar's TestClient always says "testclient"."""

from __future__ import annotations

from litestar.types import ASGIApp, Receive, Scope, Send

__all__ = ["REMOTE", "Peer"]

REMOTE = "203.0.113.7"  # TEST-NET-3: a client on another machine


class Peer:
    """`Peer(app, "127.0.0.1")`; change `host` between requests to call from somewhere else."""

    def __init__(self, app: ASGIApp, host: str = REMOTE) -> None:
        self.app = app
        self.host = host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope["client"] = (self.host, 54321)
        await self.app(scope, receive, send)
