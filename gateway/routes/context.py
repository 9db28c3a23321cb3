"""What a handler needs from the connection: the caller, the request id, and where usage goes for audit."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from litestar.connection import ASGIConnection

from gateway.auth.principal import Principal
from gateway.core.errors import AuthenticationFailed

__all__ = ["principal_of", "request_id_of", "set_audit", "usage_sink"]


def _state(connection: ASGIConnection[Any, Any, Any, Any]) -> dict[str, Any]:
    state: dict[str, Any] = connection.scope.setdefault("state", {})
    return state


def principal_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    principal = _state(connection).get("principal")
    if not isinstance(principal, Principal):  # the app-wide guard always sets it; this is a second lock
        raise AuthenticationFailed("Missing bearer token")
    return principal


def request_id_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    state = _state(connection)
    if "request_id" not in state:
        state["request_id"] = uuid.uuid4().hex
    return str(state["request_id"])


def set_audit(connection: ASGIConnection[Any, Any, Any, Any], *, resource_id: str | None = None) -> None:
    if resource_id is not None:
        _state(connection)["audit_resource_id"] = resource_id


def usage_sink(connection: ASGIConnection[Any, Any, Any, Any]) -> Callable[[int, int], None]:
    state = _state(connection)

    def record(prompt_tokens: int, completion_tokens: int) -> None:
        state["audit_prompt_tokens"] = prompt_tokens
        state["audit_completion_tokens"] = completion_tokens

    return record
