"""GET /healthz (the process answers) and GET /readyz (model loaded, data dir writable, audit log writable;
the fine-tuning worker's state where this gateway runs one).  No token.  Both are answered while the audit
log is unavailable (AuditMiddleware.ALWAYS_SERVED), so /readyz can say "audit": false."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from litestar import get
from litestar.di import NamedDependency
from litestar.response import Response

from gateway.api.models.registry import ModelRegistry
from gateway.audit.log import AuditLog
from gateway.core.settings import Settings
from gateway.core.worker_supervisor import WorkerSupervisor

__all__ = ["healthz", "readyz"]


@get("/healthz", opt={"public": True, "action": "health.live"}, include_in_schema=False)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", opt={"public": True, "action": "health.ready"}, include_in_schema=False)
async def readyz(
    registry: NamedDependency[ModelRegistry],
    settings: NamedDependency[Settings],
    worker: NamedDependency[WorkerSupervisor | None],
    audit_log: NamedDependency[AuditLog],
) -> Response[dict[str, Any]]:
    engines = registry.engines()
    engine_ready = bool(engines) and all(e.is_ready() for e in engines)
    data_dir = settings.data_path
    try:
        with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".ready-"):
            pass
        writable = os.access(data_dir, os.W_OK)
    except OSError:
        writable = False
    audit = audit_log.available  # false from a failed append until the probe's append succeeds
    ready = engine_ready and writable and audit
    body: dict[str, Any] = {
        "status": "ready" if ready else "not_ready",
        "engine": engine_ready,
        "data_dir_writable": writable,
        "audit": audit,
    }
    if worker is not None:  # reported, not required: chat is served while training is down
        body["worker"] = worker.up
    return Response(body, status_code=200 if ready else 503)
