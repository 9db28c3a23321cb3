"""The gateway's error tree; one handler turns any of them into the OpenAI error envelope.

    GatewayError                      500 server_error
    ├── InvalidRequest                400 invalid_request_error   (param names the field)
    │   └── ContextLengthExceeded     400 invalid_request_error   code=context_length_exceeded
    ├── AuthenticationFailed          401 invalid_request_error   code=invalid_api_key
    ├── PermissionDenied              403 invalid_request_error   code=insufficient_scope
    │   └── QuotaExceeded             403 invalid_request_error   code=quota_exceeded (storage, file count)
    ├── NotFound                      404 invalid_request_error   code=<kind>_not_found
    ├── RequestTimeout                408 invalid_request_error   code=request_timeout
    ├── Conflict                      409 invalid_request_error
    ├── PayloadTooLarge               413 invalid_request_error   code=payload_too_large
    ├── RateLimited                   429 rate_limit_exceeded     (Retry-After header)
    ├── EngineUnavailable             503 server_error            code=engine_unavailable
    ├── EngineFailure                 500 server_error            code=engine_error
    └── AuditUnavailable              503 server_error            code=audit_unavailable (fail closed)

Services raise these; routes never build error responses by hand.  Messages are written for the client and
never carry prompt or file content.
"""

from __future__ import annotations

__all__ = [
    "AuditUnavailable",
    "AuthenticationFailed",
    "Conflict",
    "ContextLengthExceeded",
    "EngineFailure",
    "EngineUnavailable",
    "GatewayError",
    "InvalidRequest",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "QuotaExceeded",
    "RateLimited",
    "RequestTimeout",
    "error_envelope",
]


class GatewayError(Exception):
    status_code = 500
    error_type = "server_error"
    default_code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}

    def envelope(self) -> dict[str, dict[str, str | None]]:
        return error_envelope(self.message, self.error_type, self.param, self.code)


def error_envelope(
    message: str, error_type: str, param: str | None, code: str | None
) -> dict[str, dict[str, str | None]]:
    """OpenAI's error body, the one place it is built: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"
    default_code: str | None = None


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"


class AuthenticationFailed(GatewayError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"

    def __init__(self, message: str, *, error: str = "invalid_token") -> None:
        super().__init__(message, headers={"WWW-Authenticate": f'Bearer error="{error}"'})


class PermissionDenied(GatewayError):
    status_code = 403
    error_type = "invalid_request_error"
    default_code = "insufficient_scope"


class QuotaExceeded(PermissionDenied):
    """A tenant's stored bytes or file count is at its configured quota (quotas.*)."""

    default_code = "quota_exceeded"


class NotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class RequestTimeout(GatewayError):
    """The request (its body) did not arrive in time; the connection is closed after the answer."""

    status_code = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class Conflict(GatewayError):
    status_code = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class RateLimited(GatewayError):
    status_code = 429
    error_type = "rate_limit_exceeded"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int = 1, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(max(1, retry_after))})


class EngineUnavailable(GatewayError):
    status_code = 503
    default_code = "engine_unavailable"


class EngineFailure(GatewayError):
    status_code = 500
    default_code = "engine_error"


class AuditUnavailable(GatewayError):
    """The audit record cannot be written (disk full, I/O error): the request is refused, not served."""

    status_code = 503
    default_code = "audit_unavailable"
