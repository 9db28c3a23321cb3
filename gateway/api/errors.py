"""One place that turns every failure into the OpenAI error envelope with the right status."""

from __future__ import annotations

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


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.error("request.unhandled_error", error_type=type(exc).__name__, path=request.url.path)
    return _envelope(
        500, "The server had an error while processing your request.", "server_error", None, "internal_error"
    )


EXCEPTION_HANDLERS: dict[Any, Any] = {
    GatewayError: _gateway_error,
    HTTPException: _http_error,
    Exception: _unexpected,
}
