"""One place that turns every failure into the OpenAI error envelope with the right status (a full data
disk, ENOSPC or SQLITE_FULL from anywhere, is a 503 `insufficient_storage` with Retry-After)."""

from __future__ import annotations

import errno
import sqlite3
from typing import Any

import structlog
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, NotAuthorizedException, PermissionDeniedException
from litestar.exceptions import NotFoundException as LitestarNotFound

from gateway.core.errors import GatewayError, error_envelope

__all__ = ["EXCEPTION_HANDLERS"]

log = structlog.get_logger(__name__)

_HTTP_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "insufficient_scope"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "payload_too_large"),
    429: ("rate_limit_exceeded", "rate_limit_exceeded"),
}


def _envelope(
    status: int,
    message: str,
    type_: str,
    param: str | None,
    code: str | None,
    headers: dict[str, str] | None = None,
) -> Response[Any]:
    body = error_envelope(message, type_, param, code)
    return Response(body, status_code=status, media_type=MediaType.JSON, headers=headers)


def _gateway_error(_: Request[Any, Any, Any], exc: GatewayError) -> Response[Any]:
    return _envelope(exc.status_code, exc.message, exc.error_type, exc.param, exc.code, exc.headers)


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    status = exc.status_code
    type_, code = _HTTP_TYPES.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    if isinstance(exc, LitestarNotFound) or status == 404:
        message = f"Unknown request URL: {request.method} {request.url.path}."
    elif status == 413:
        message = "The request body is too large."
    elif status >= 500:
        message = "The server had an error while processing your request."
    else:
        message = exc.detail
    headers = dict(exc.headers or {})
    if isinstance(exc, NotAuthorizedException | PermissionDeniedException) and status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return _envelope(status, message, type_, None, code, headers or None)


_STORAGE_FULL = {errno.ENOSPC, errno.EDQUOT}
_SQLITE_FULL = 13  # SQLITE_FULL: "database or disk is full"


def _storage_full(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """The data dir's filesystem is full (or over quota): 503 with Retry-After, nothing stored; else a 500."""
    full = isinstance(exc, OSError) and exc.errno in _STORAGE_FULL
    full = full or getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL
    if not full:
        return _unexpected(request, exc)
    log.error("request.storage_full", error_type=type(exc).__name__, path=request.url.path)
    return _envelope(
        503,
        "The server's storage is full, so nothing was stored; retry later.",
        "server_error",
        None,
        "insufficient_storage",
        {"Retry-After": "30"},
    )


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.error("request.unhandled_error", error_type=type(exc).__name__, path=request.url.path)
    return _envelope(
        500, "The server had an error while processing your request.", "server_error", None, "internal_error"
    )


EXCEPTION_HANDLERS: dict[Any, Any] = {
    GatewayError: _gateway_error,
    HTTPException: _http_error,
    OSError: _storage_full,
    sqlite3.OperationalError: _storage_full,
    Exception: _unexpected,
}
