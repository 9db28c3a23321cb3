"""Slow and huge clients: bounds on connections, on the time to send headers and on the time to send a body.

uvicorn bounds none of these by itself (it has no header timeout; its `limit_concurrency` answers 503 from
outside the app, so those answers would go unaudited), so `gateway serve` adds two small pieces:

- `bounded_protocol(server)`: uvicorn's httptools protocol with
  - a connection cap, in all (`server.max_connections`) and per client address
    (`server.max_connections_per_client`): a connection past it gets a bare 503 and is closed as soon as it
    is made, before any byte of a request is read;
  - a header deadline (`server.header_timeout_seconds`), from the connection's start, or from the first byte
    of the next request on a kept-alive one, to the end of the request's headers: past it the client gets a
    bare 408 and the connection is closed;
  - upgrade requests (WebSocket handshakes; `gateway serve` runs uvicorn with ws="none") served as plain
    HTTP, audited like any request, and the connection closed after the answer.
  Neither refusal reached the app: no request was read, so there is nothing to audit; each is logged with the
  client address (`http.connection_refused`, `http.header_timeout`).  TLS handshakes come before all this,
  under asyncio's own 60 s handshake timeout.
- `BodyDeadline`: an ASGI layer inside the audit wrapper: a request whose body has not arrived in full within
  `server.body_timeout_seconds` of its headers gets a 408 (RequestTimeout, rendered by the app, so audited)
  and its connection is closed after it.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import anyio
import structlog
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.core.errors import RequestTimeout, error_envelope
from gateway.core.settings import ServerSettings

__all__ = ["BodyDeadline", "bounded_protocol"]

log = structlog.get_logger(__name__)


def _bare_response(status: bytes, message: str, code: str, extra: bytes = b"") -> bytes:
    kind = "invalid_request_error" if status.startswith(b"4") else "server_error"
    body = json.dumps(error_envelope(message, kind, None, code)).encode()
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n" + extra
        + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip


_TOO_MANY = _bare_response(
    b"503 Service Unavailable",
    "Too many open connections; retry shortly.",
    "too_many_connections",
    b"retry-after: 1\r\n",
)
_HEADER_TIMEOUT = _bare_response(
    b"408 Request Timeout", "The request headers did not arrive in time.", "request_timeout"
)


def bounded_protocol(server: ServerSettings) -> type[HttpToolsProtocol]:
    """The protocol class to hand uvicorn (`http=`), bound to these limits."""
    total, per_client = server.max_connections, server.max_connections_per_client
    header_timeout = server.header_timeout_seconds
    open_per_client: Counter[str] = Counter()  # one event loop runs every connection: no lock needed

    class BoundedHttpProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _counted: str | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            host = self.client[0] if self.client else "?"
            if len(self.connections) > total or open_per_client[host] >= per_client:
                log.warning("http.connection_refused", client=host, open=len(self.connections))
                transport.write(_TOO_MANY)
                transport.close()
                return
            open_per_client[host] += 1
            self._counted = host
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            if self._counted is not None:
                open_per_client[self._counted] -= 1
                if open_per_client[self._counted] <= 0:
                    del open_per_client[self._counted]
                self._counted = None
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:  # the next request on a kept-alive connection
                self._arm_header_timer()

        def on_headers_complete(self) -> None:
            self._disarm_header_timer()
            super().on_headers_complete()

        def _unsupported_upgrade_warning(self) -> None:
            # ws="none": the handshake was served as a plain HTTP request (and audited); close after it.
            log.info("http.upgrade_refused", client=self.client[0] if self.client else None)
            if self.cycle is not None:
                self.cycle.keep_alive = False

        def _arm_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout, self._header_timed_out)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timed_out(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                # A request is being served (its body has its own deadline); the next one, pipelined behind
                # it, gets its header deadline again from now.
                self._arm_header_timer()
                return
            log.warning("http.header_timeout", client=self.client[0] if self.client else None)
            self.transport.write(_HEADER_TIMEOUT)
            self.transport.close()

    return BoundedHttpProtocol


class BodyDeadline:
    """ASGI: the whole request body within `seconds` of the app being called, else 408 and close."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = anyio.current_time() + self.seconds
        state = {"body_done": False, "timed_out": False}

        async def bounded_receive() -> Any:
            if state["body_done"]:
                return await receive()  # after the body: only a disconnect can come, at any time
            message: Any = None
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                message = await receive()
            if message is None:
                state["timed_out"] = True
                raise RequestTimeout(f"The request body did not arrive within {self.seconds:g} seconds.")
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_done"] = True
            return message

        async def send_closing(message: Message) -> None:
            if state["timed_out"] and message["type"] == "http.response.start":
                # The rest of the body may still be on its way: do not keep reading it.
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, bounded_receive, send_closing)
