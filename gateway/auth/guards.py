"""App-wide Litestar guards: default-deny authorization, then per-subject and per-tenant limits.

    gate = Gate(verifier, rate=RateLimiter(600), concurrency=ConcurrencyLimiter(32))
    Litestar(..., guards=gate.guards, dependencies={"principal": Provide(provide_principal, ...)})

A handler is public only if it says so (`opt={"public": True}`); every other one needs a valid Bearer token
(401) holding the handler's `opt["scope"]` (403).  A handler that names no scope is for admins only, so a
forgotten `opt` fails closed instead of open.  The Principal is put in the request's state before the scope
check, so the audit record of a refused request still names who was refused.  A gate built with no verifier
(auth.enabled = false, development only) lets everyone in as ANONYMOUS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

from gateway.auth.limits import ConcurrencyLimiter, RateLimiter
from gateway.auth.tokens import TokenVerifier
from gateway.core.errors import AuthenticationFailed, PermissionDenied
from gateway.core.principal import ALL_SCOPES, Principal
from gateway.core.request_state import request_state

__all__ = ["ANONYMOUS", "Gate", "provide_principal"]

ANONYMOUS = Principal(subject="anonymous", tenant="default", scopes=ALL_SCOPES)


def _bearer_token(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    header = connection.headers.get("authorization")
    if not header:
        missing = AuthenticationFailed("Missing bearer token: send `Authorization: Bearer <token>`")
        missing.headers["WWW-Authenticate"] = "Bearer"  # RFC 6750 §3.1: no error code when none was sent
        raise missing
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise AuthenticationFailed(
            "Malformed Authorization header: expected `Bearer <token>`", error="invalid_request"
        )
    return token


@dataclass(frozen=True)
class Gate:
    verifier: TokenVerifier | None  # None: authentication is off (auth.enabled = false)
    rate: RateLimiter | None = None
    concurrency: ConcurrencyLimiter | None = None

    @property
    def guards(self) -> list[Guard]:
        return [self.authorize, self.apply_limits]

    def authorize(
        self, connection: ASGIConnection[Any, Any, Any, Any], route_handler: BaseRouteHandler
    ) -> None:
        """Default deny: public handlers pass; others need a token with the handler's scope (or admin)."""
        opt = route_handler.opt
        if opt.get("public") is True:
            return
        principal = ANONYMOUS if self.verifier is None else self.verifier.verify(_bearer_token(connection))
        request_state(connection.scope).principal = principal
        required = opt.get("scope")
        if not isinstance(required, str):
            if not principal.is_admin:
                raise PermissionDenied("This endpoint is restricted to administrators.")
            return
        if not principal.has(required):
            raise PermissionDenied(
                f"This token lacks the '{required}' scope.",
                headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{required}"'},
            )

    def apply_limits(
        self, connection: ASGIConnection[Any, Any, Any, Any], route_handler: BaseRouteHandler
    ) -> None:
        """Per-subject rate, then a per-tenant in-flight slot; public handlers pass.  The slot is released
        when the response has been sent (streams included): AuditMiddleware runs the request's `on_done`."""
        state = request_state(connection.scope)
        if route_handler.opt.get("public") is True or state.principal is None:
            return
        if self.rate is not None:
            self.rate.check(state.principal.subject)
        if self.concurrency is not None:
            state.on_done.append(self.concurrency.acquire(state.principal.tenant).release)


def provide_principal(request: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    """Dependency: `Provide(provide_principal, sync_to_thread=False)`; the guard has set it already."""
    principal = request_state(request.scope).principal
    if principal is None:  # the app-wide guard always sets it on a non-public route; this is a second lock
        raise AuthenticationFailed("Missing bearer token")
    return principal
