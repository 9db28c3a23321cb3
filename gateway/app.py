"""create_app(settings) -> the ASGI application: Litestar routes inside the audit wrapper.  Wiring only.

It builds, in order: the private data dir, the audit log, the gate (token verifier and limits), the model
registry with one engine per base model (the default one started in the background, so /healthz answers
while the model loads and /readyz turns 200 when it is in), and the services the routes use
(gateway/api/services.py), each handed to the handlers by dependency injection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import structlog
from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.datastructures import State
from litestar.types import ASGIApp, ControllerRouterHandler

from contracts.private_files import ensure_private_dir
from gateway.api.chat.routes import ChatController
from gateway.api.embeddings.routes import EmbeddingsController
from gateway.api.errors import EXCEPTION_HANDLERS
from gateway.api.files.routes import FilesController
from gateway.api.fine_tuning.routes import FineTuningController
from gateway.api.models.registry import ModelRegistry
from gateway.api.models.routes import ModelsController
from gateway.api.ops.audit import list_audit_records
from gateway.api.ops.health import healthz, readyz
from gateway.api.ops.metrics import metrics_route
from gateway.api.responses.routes import ResponsesController
from gateway.api.services import Services
from gateway.audit.flood import UnauthenticatedFlood
from gateway.audit.log import AuditLog, open_audit_log
from gateway.audit.middleware import AuditMiddleware
from gateway.auth.guards import Gate
from gateway.auth.limits import ConcurrencyLimiter, RateLimiter
from gateway.auth.tokens import TokenVerifier
from gateway.core.settings import Settings, auto_value
from gateway.core.worker_supervisor import WorkerSupervisor
from gateway.engine.base import Engine
from gateway.engine.factory import EmbeddingEngineFactory, EngineFactory, build_engine
from gateway.security.master_key import cipher_from_settings
from gateway.security.slow_clients import BodyDeadline

__all__ = ["create_app", "litestar_of", "services_of"]

log = structlog.get_logger(__name__)

TENANT_CONCURRENCY_UNTIL_SIZED = 32  # limits.tenant_concurrency = auto, before any engine has been sized


def create_app(
    settings: Settings,
    *,
    engines: dict[str, Engine] | None = None,
    engine_factory: EngineFactory | None = None,
    worker: WorkerSupervisor | None = None,
    on_engine_failed: Callable[[], None] | None = None,
    embedding_engine_factory: EmbeddingEngineFactory | None = None,
) -> ASGIApp:
    """`engines` lets tests inject ready engines; otherwise the default base model's engine is started in the
    background and other base models start on first use. `worker`: the fine-tuning worker process to keep
    running while the app runs. `embedding_engine_factory`: model name -> a started embedding engine
    (embedding engines start on first use). `on_engine_failed` is called once when an engine gave up (it could
    not rebuild itself): `gateway serve` then exits non-zero so systemd or the container runtime restarts
    it."""
    ensure_private_dir(settings.data_path)
    audit_log = open_audit_log(settings)
    flood = UnauthenticatedFlood(settings.limits.unauthenticated_per_minute)
    tenant_limit = auto_value(settings.limits.tenant_concurrency)
    concurrency = ConcurrencyLimiter(TENANT_CONCURRENCY_UNTIL_SIZED if tenant_limit is None else tenant_limit)
    gate = Gate(
        TokenVerifier.from_settings(settings) if settings.auth.enabled else None,
        rate=RateLimiter(settings.limits.requests_per_minute),
        concurrency=concurrency,
    )
    starter = engine_factory or (lambda name: build_engine(settings, name))
    sized: list[int] = []  # each started engine's suggested per-tenant limit (auto)

    def start_engine(name: str) -> Engine:
        engine = starter(name)
        suggested = engine.stats().tenant_concurrency
        if tenant_limit is None and suggested > 0:
            sized.append(suggested)
            concurrency.set_limit(max(sized))
            log.info("limits.tenant_concurrency_sized", limit=max(sized), model=engine.model_name)
        return engine

    registry = ModelRegistry(
        engines or {},
        engine_starter=start_engine,
        base_models=settings.models.names(),
        embedding_models=settings.embeddings.names(),
    )
    services = Services.build(
        settings,
        registry,
        cipher=cipher_from_settings(settings),
        audit_log=audit_log,
        worker=worker,
        embedding_engine_factory=embedding_engine_factory,
    )
    background: set[asyncio.Task[Any]] = set()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if not engines:
            task = asyncio.create_task(_start_default(registry, settings.models.default))
            background.add(task)
            task.add_done_callback(background.discard)
        watch = asyncio.create_task(_watch_engines(registry, on_engine_failed))
        probe = asyncio.create_task(_audit_housekeeping(audit_log, flood, settings.audit.probe_seconds))
        await services.start()
        try:
            yield
        finally:
            watch.cancel()
            probe.cancel()
            await asyncio.to_thread(_append_all, audit_log, flood.due(flush_all=True))
            await services.close()
            for engine in registry.engines():
                await asyncio.to_thread(engine.shutdown)
            audit_log.close()

    config = AppConfig(
        route_handlers=_routes(settings, gate),
        guards=gate.guards,
        dependencies=services.dependencies(),
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[lifespan],
        state=State({"services": services}),  # for tools and tests (services_of); handlers get DI
        request_max_body_size=settings.server.max_body_bytes,
        openapi_config=None,
        debug=False,
    )
    app = Litestar.from_config(config)
    bounded = BodyDeadline(app, settings.server.body_timeout_seconds)  # inside the audit: a 408 is recorded
    return AuditMiddleware(
        bounded, audit_log, append=services.metrics.observing(audit_log.append), flood=flood
    )


def litestar_of(app: Any) -> Litestar:
    """The Litestar app inside what create_app returns (its audit and body-deadline wrappers)."""
    inner: Any = app
    while isinstance(inner, AuditMiddleware | BodyDeadline):
        inner = inner.app
    litestar: Litestar = inner
    return litestar


def services_of(app: Any) -> Services:
    """The Services of an app create_app built."""
    services: Services = litestar_of(app).state["services"]
    return services


def _routes(settings: Settings, gate: Gate) -> list[ControllerRouterHandler]:
    """Every route the gateway serves, one resource per line (tests walk them: default deny)."""
    return [
        healthz,
        readyz,
        metrics_route(settings, gate),
        list_audit_records,
        ChatController,
        ResponsesController,
        EmbeddingsController,
        ModelsController,
        FilesController,
        FineTuningController,
    ]


async def _watch_engines(registry: ModelRegistry, on_failed: Callable[[], None] | None) -> None:
    """Once an engine has given up, /readyz stays 503 and the process should be restarted."""
    while True:
        await asyncio.sleep(1.0)
        failed = [engine.model_name for engine in registry.engines() if engine.is_failed()]
        if failed:
            log.critical("gateway.engine_failed", models=failed)
            if on_failed is not None:
                on_failed()
            return


async def _audit_housekeeping(audit_log: AuditLog, flood: UnauthenticatedFlood, every: float) -> None:
    """Fail closed, then recover: while the log is unavailable, try its `audit.recovered` append; and write
    the summary records of unauthenticated floods whose window is over."""
    while True:
        await asyncio.sleep(every)
        if not audit_log.available:
            await asyncio.to_thread(audit_log.probe)
        elif summaries := flood.due():
            await asyncio.to_thread(_append_all, audit_log, summaries)


def _append_all(audit_log: AuditLog, records: list[dict[str, Any]]) -> None:
    for record in records:
        try:
            audit_log.append(record)
        except (OSError, RuntimeError) as exc:  # the log is down: the probe takes over
            log.error("audit.summary_not_written", action=record.get("action"), error_type=type(exc).__name__)
            return


async def _start_default(registry: ModelRegistry, name: str) -> None:
    try:
        await registry.start_engine(name)
    except Exception as exc:  # the service keeps answering /healthz; /readyz and chat report 503
        log.error("engine.start_failed", model=name, error_type=type(exc).__name__, error=str(exc)[:200])
