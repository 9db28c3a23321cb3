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
from litestar.di import NamedDependency

from gateway.api.params import query_int
from gateway.audit.log import MAX_PAGE, AuditLog
from gateway.core.errors import InvalidRequest

__all__ = ["list_audit_records"]

_MAX_TENANT_CHARS = 256


@get("/v1/audit", opt={"scope": "admin", "action": "audit.list"})
async def list_audit_records(
    request: Request[Any, Any, Any], audit_log: NamedDependency[AuditLog]
) -> dict[str, Any]:
    after = query_int(request, "after", default=0, minimum=0, maximum=2**63 - 1)
    limit = query_int(request, "limit", default=100, minimum=1, maximum=MAX_PAGE)
    tenant = request.query_params.get("tenant")
    if tenant is not None and not 0 < len(tenant) <= _MAX_TENANT_CHARS:
        raise InvalidRequest("Invalid value for 'tenant'.", param="tenant")
    page = await anyio.to_thread.run_sync(audit_log.page, after, limit, tenant)
    return {"object": "list", "data": page.records, "has_more": page.has_more, "last_seq": page.last_seq}
