"""GET /v1/audit: page through the audit log (admins only).

    GET /v1/audit?after=<seq>&limit=<1..1000>&tenant=<org>
    -> {"object": "list", "data": [record, ...], "has_more": bool, "last_seq": int}

Records come back as written, `seq`, `prev` and `mac` included, so a copy shipped elsewhere can be checked
against the chain.  Pass `last_seq` as the next `after`.  Reading the log is itself a request, so it is
audited like any other.
"""

from __future__ import annotations

from typing import Any

import anyio
from litestar import Request, get

from gateway.audit.log import MAX_PAGE, AuditLog
from gateway.core.errors import InvalidRequest

__all__ = ["list_audit_records"]

_MAX_TENANT_CHARS = 256


def _int_param(request: Request[Any, Any, Any], name: str, default: int, minimum: int, maximum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or len(raw) > 19:
        raise InvalidRequest(f"Invalid value for '{name}': expected a non-negative integer.", param=name)
    value = int(raw)
    if not minimum <= value <= maximum:
        raise InvalidRequest(
            f"Invalid value for '{name}': must be between {minimum} and {maximum}.", param=name
        )
    return value


@get("/v1/audit", opt={"scope": "admin", "action": "audit.list"})
async def list_audit_records(request: Request[Any, Any, Any]) -> dict[str, Any]:
    after = _int_param(request, "after", 0, 0, 2**63 - 1)
    limit = _int_param(request, "limit", 100, 1, MAX_PAGE)
    tenant = request.query_params.get("tenant")
    if tenant is not None and not 0 < len(tenant) <= _MAX_TENANT_CHARS:
        raise InvalidRequest("Invalid value for 'tenant'.", param="tenant")
    audit_log: AuditLog = request.app.state["audit_log"]
    page = await anyio.to_thread.run_sync(audit_log.page, after, limit, tenant)
    return {"object": "list", "data": page.records, "has_more": page.has_more, "last_seq": page.last_seq}
