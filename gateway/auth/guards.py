"""App-wide Litestar guards: default-deny authorization, then per-subject and per-tenant limits.

    Litestar(..., guards=[authorize, apply_limits])

A handler is public only if it says so (`opt={"public": True}`); every other one needs a valid Bearer token
(401) holding the handler's `opt["scope"]` (403).  A handler that names no scope is for admins only, so a
forgotten `opt` fails closed instead of open.  The Principal is stored at scope["state"]["principal"] before
the scope check, so the audit record of a refused request still names who was refused.
"""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from gateway.auth.limits import ConcurrencyLimiter, RateLimiter, Slot
from gateway.auth.principal import ALL_SCOPES, Principal
from gateway.auth.tokens import TokenVerifier
from gateway.core.errors import AuthenticationFailed, GatewayError, PermissionDenied

__all__ = ["ANONYMOUS", "apply_limits", "authorize", "provide_principal", "release_tenant_slot"]

ANONYMOUS = Principal(subject="anonymous", tenant="default", scopes=ALL_SCOPES)
TENANT_SLOT = "tenant_slot"


def _connection_state(connection: ASGIConnection[Any, Any, Any, Any]) -> dict[str, Any]:
    return connection.scope.setdefault("state", {})


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


def _authenticate(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    app_state = connection.app.state
    settings = app_state.get("settings")
    if settings is not None and not settings.auth.enabled:
        return ANONYMOUS
    verifier = app_state.get("verifier")
    if not isinstance(
        verifier, TokenVerifier
    ):  # auth on but no verifier: refuse everyone, never wave through
        raise GatewayError("authentication is not configured")
    return verifier.verify(_bearer_token(connection))


def authorize(connection: ASGIConnection[Any, Any, Any, Any], route_handler: BaseRouteHandler) -> None:
    """Default deny: public handlers pass; others need a token with the handler's scope (or admin)."""
    opt = route_handler.opt
    if opt.get("public") is True:
        return
    principal = _authenticate(connection)
    _connection_state(connection)["principal"] = principal
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


def apply_limits(connection: ASGIConnection[Any, Any, Any, Any], route_handler: BaseRouteHandler) -> None:
    """Per-subject rate, then a per-tenant in-flight slot; public handlers and unlimited apps pass.

    The slot is held in scope["state"]["tenant_slot"] and released by AuditMiddleware when the response
    has been sent (streams included), via release_tenant_slot.
    """
    principal = _connection_state(connection).get("principal")
    if route_handler.opt.get("public") is True or not isinstance(principal, Principal):
        return
    app_state = connection.app.state
    rate = app_state.get("rate_limiter")
    if isinstance(rate, RateLimiter):
        rate.check(principal.subject)
    concurrency = app_state.get("tenant_limiter")
    if isinstance(concurrency, ConcurrencyLimiter):
        _connection_state(connection)[TENANT_SLOT] = concurrency.acquire(principal.tenant)


def release_tenant_slot(state: dict[str, Any]) -> None:
    slot = state.pop(TENANT_SLOT, None)
    if isinstance(slot, Slot):
        slot.release()


def provide_principal(request: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    """Dependency: `Provide(provide_principal, sync_to_thread=False)`; the guard has set it already."""
    principal = _connection_state(request).get("principal")
    if not isinstance(principal, Principal):
        raise AuthenticationFailed("Missing bearer token")
    return principal
