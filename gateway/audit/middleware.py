"""AuditMiddleware: the outermost ASGI layer, writing exactly one audit record per HTTP request.

It sits outside Litestar so that nothing escapes it: unrouted paths (404), refused tokens (401/403), limits
(429), handler errors and streams that end with the client gone all produce one record.  It reads what the
inner layers left: `route_handler` and `path_template` in the scope (Litestar's router), and the request's
RequestState (gateway/core/request_state.py): the principal (the guard), the resource id and token counts
(handlers).  The record is written just before the response's last chunk is handed over (a streamed
response's generator has finished by then, so token counts are final), or, for a response that never
finished (client gone, handler error), once the app has returned.

Fail closed: no response is delivered whose record was not written.  A single-message response is held
until its record is on disk; if the append fails, the client gets a 503 `audit_unavailable` envelope
instead.  A streamed response goes out only while the log is available, and one whose record fails at the
end is cut off before its last chunk (the client sees an incomplete stream, never a complete unaudited one).
While the log is unavailable (audit/log.py: from a failed append until the probe's append succeeds) every
request but the health probes is refused with 503 before the app sees it, so nothing is done unaudited.

The request id is the caller's `x-request-id` when it is a plain token (<= 64 of [A-Za-z0-9._-]), else a new
uuid4 hex; it is echoed as the `x-request-id` response header, bound into structlog's context for the
request, and kept in the RequestState for handlers.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import structlog
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway.audit.flood import UnauthenticatedFlood
from gateway.audit.log import AuditLog
from gateway.core.errors import AuditUnavailable, GatewayError
from gateway.core.request_state import RequestState, request_state

__all__ = [
    "ALWAYS_SERVED",
    "REQUEST_ID_HEADER",
    "AuditMiddleware",
    "outcome_for",
    "send_error",
    "send_unavailable",
]

log = structlog.get_logger(__name__)

REQUEST_ID_HEADER = b"x-request-id"
_REQUEST_ID_RE = re.compile(rb"^[A-Za-z0-9._-]{1,64}$")
CLIENT_CLOSED = 499  # nginx's "client closed request": the response never finished
# Served while the audit log is unavailable (their records are skipped, counted in the probe's record), so
# that /readyz can say why the gateway is not ready.
ALWAYS_SERVED = frozenset({"/healthz", "/readyz"})
_UNAVAILABLE = AuditUnavailable(
    "The audit log cannot be written right now, so this request was not served; retry later.",
    headers={"Retry-After": "5"},
)


async def send_error(send: Send, request_id: str, error: GatewayError) -> None:
    """An error envelope sent in full from here, outside the app (audit unavailable, a flood's 429)."""
    body = json.dumps(error.envelope()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode(), value.encode()) for name, value in error.headers.items()),
        (REQUEST_ID_HEADER, request_id.encode()),
    ]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_unavailable(send: Send, request_id: str) -> None:
    """The 503 audit_unavailable answer, sent in full (its own record cannot be written)."""
    await send_error(send, request_id, _UNAVAILABLE)


def outcome_for(status: int) -> str:
    if status in (401, 403, 429):
        return "denied"
    return "allowed" if status < 400 else "error"


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER and _REQUEST_ID_RE.match(value):
            return value.decode()
    return uuid.uuid4().hex


def _unfinished_status(started: int | None, failure: BaseException | None) -> int:
    """The status to record for a response whose last chunk was never sent: 499 if the client went away."""
    if failure is None or isinstance(failure, anyio.get_cancelled_exc_class()):
        return CLIENT_CLOSED if started is not None or failure is not None else 500
    return 500


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class AuditMiddleware:
    """Wraps the whole ASGI app; `append` defaults to the log's and runs in a worker thread (it fsyncs)."""

    def __init__(
        self,
        app: ASGIApp,
        audit_log: AuditLog,
        *,
        append: Callable[[dict[str, Any]], Any] | None = None,
        flood: UnauthenticatedFlood | None = None,
    ) -> None:
        self.app = app
        self.audit_log = audit_log
        self._append = append or audit_log.append
        self.flood = flood

    def _flood_refusal(self, scope: Scope, state: RequestState, status: int | None) -> GatewayError | None:
        """A refused request with no identity, past its address's budget: the 429 to send unrecorded."""
        if self.flood is None or state.principal is not None or status is None or status < 400:
            return None
        client = scope.get("client")
        return self.flood.refuse(client[0] if client else "unknown")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        raw_path, method = str(scope.get("path", "")), str(scope.get("method", ""))
        always_served = raw_path in ALWAYS_SERVED
        if not self.audit_log.available and not always_served:
            self.audit_log.note_refused()
            await send_unavailable(send, request_id)
            return
        state = request_state(scope)
        state.request_id = request_id
        started_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        start = time.perf_counter()
        response: dict[str, Any] = {"status": None, "written": False, "start": None, "aborted": False}

        async def write(status: int) -> bool:
            """Append the record; False if it could not be written (the log is then unavailable)."""
            response["written"] = True
            if always_served and not self.audit_log.available:
                self.audit_log.note_refused()
                return True  # a probe answers while the log is down (it says so); its record is counted
            record = self._record(scope, state, request_id, started_at, start, raw_path, method, status)
            # Shielded: a cancelled request (client gone) must still leave its record.
            with anyio.CancelScope(shield=True):
                try:
                    await anyio.to_thread.run_sync(self._append, record)
                except Exception as exc:
                    log.error("audit.append_failed", request_id=request_id, error_type=type(exc).__name__)
                    self.audit_log.mark_failed()
                    return always_served
            return True

        async def send_with_id(message: Message) -> None:
            if response["aborted"]:
                return  # the record failed: nothing more of this response goes out
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
                headers.append((REQUEST_ID_HEADER, request_id.encode()))
                response["status"] = message["status"]
                response["start"] = {**message, "headers": headers}  # held until the body shows its kind
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            final = not message.get("more_body", False)
            held, response["start"] = response["start"], None
            if final and held is not None and not always_served:
                refusal = self._flood_refusal(scope, state, response["status"])
                if refusal is not None:  # counted in the address's flood window instead of a record
                    response["written"] = response["aborted"] = True
                    await send_error(send, request_id, refusal)
                    return
            if final:
                # Write-ahead: the record is on disk before the client can see the response end, so a
                # response received in full has its record even if the process dies a moment later.
                if not await write(response["status"]):
                    response["aborted"] = True
                    if held is not None:  # nothing sent yet: the whole answer becomes the 503
                        await send_unavailable(send, request_id)
                    else:  # a stream: cut off before its last chunk
                        log.error("audit.stream_cut", request_id=request_id)
                    return
            elif held is not None and not self.audit_log.available and not always_served:
                response["aborted"] = True  # a stream about to start while the log is down
                self.audit_log.note_refused()
                response["written"] = True
                await send_unavailable(send, request_id)
                return
            if held is not None:
                await send(held)
            await send(message)

        failure: BaseException | None = None
        try:
            with structlog.contextvars.bound_contextvars(request_id=request_id):
                await self.app(scope, receive, send_with_id)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            try:
                state.finish()  # the tenant's in-flight slot, and anything else held for the request
            except Exception as exc:
                log.error("request.release_failed", request_id=request_id, error_type=type(exc).__name__)
            if not response["written"]:
                status = _unfinished_status(response["status"], failure)
                if always_served or self._flood_refusal(scope, state, status) is None:
                    await write(status)

    @staticmethod
    def _record(
        scope: Scope,
        state: RequestState,
        request_id: str,
        started_at: str,
        start: float,
        raw_path: str,
        method: str,
        status: int,
    ) -> dict[str, Any]:
        handler = scope.get("route_handler")
        opt = getattr(handler, "opt", None) or {}
        principal = state.principal
        client = scope.get("client")
        return {
            "time": started_at,
            "request_id": request_id,
            "subject": principal.subject if principal is not None else None,
            "tenant": principal.tenant if principal is not None else None,
            "client": client[0] if client else None,
            "method": method,
            # The template (/v1/models/{model_id:str}) when routed; the raw path only for unrouted requests.
            "route": scope.get("path_template") or raw_path,
            "action": _str_or_none(opt.get("action")),
            "resource_id": _str_or_none(state.resource_id),
            "status": status,
            "outcome": outcome_for(status),
            "duration_ms": round((time.perf_counter() - start) * 1000, 3),
            "prompt_tokens": _int_or_none(state.prompt_tokens),
            "completion_tokens": _int_or_none(state.completion_tokens),
        }
