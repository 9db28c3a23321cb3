"""create_app(settings) -> the ASGI application: Litestar routes inside the audit wrapper.

The lifespan builds, in order: the private data dir, the token verifier, the audit log, the model registry
with one engine per base model (started in the background, so /healthz answers while the model loads and
/readyz turns 200 when it is in), and the services the routes use.
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
from litestar.di import Provide
from litestar.types import ASGIApp

from contracts.private_files import ensure_private_dir
from gateway.audit.log import open_audit_log
from gateway.audit.middleware import AuditMiddleware
from gateway.auth.guards import apply_limits, authorize
from gateway.auth.limits import ConcurrencyLimiter, RateLimiter
from gateway.auth.tokens import TokenVerifier
from gateway.core.settings import Settings
from gateway.core.worker_supervisor import WorkerSupervisor
from gateway.engine.base import Engine
from gateway.engine.factory import EngineFactory, build_engine
from gateway.observability.metrics import GatewayMetrics
from gateway.routes.audit import list_audit_records
from gateway.routes.chat import ChatController
from gateway.routes.errors import EXCEPTION_HANDLERS
from gateway.routes.files import FilesController
from gateway.routes.fine_tuning import FineTuningController
from gateway.routes.health import healthz, readyz
from gateway.routes.metrics import metrics_route
from gateway.routes.models import ModelsController
from gateway.security.master_key import cipher_from_settings
from gateway.serving.chat import ChatService
from gateway.serving.finetuned import FineTuningServices
from gateway.serving.registry import ModelRegistry

__all__ = ["create_app"]

log = structlog.get_logger(__name__)


def _base_model_names(settings: Settings) -> list[str]:
    return [settings.models.default, *[n for n in settings.models.base if n != settings.models.default]]


def create_app(
    settings: Settings,
    *,
    engines: dict[str, Engine] | None = None,
    engine_factory: EngineFactory | None = None,
    worker: WorkerSupervisor | None = None,
    on_engine_failed: Callable[[], None] | None = None,
) -> ASGIApp:
    """`engines` lets tests inject ready engines; otherwise the default base model's engine is started in
    the background and other base models start on first use.  `worker`: the fine-tuning worker process to
    keep running while the app runs.  `on_engine_failed` is called once when an engine gave up (it could not
    rebuild itself): `gateway serve` then exits non-zero so systemd or the container runtime restarts it."""
    data_dir = ensure_private_dir(settings.data_path)
    factory = engine_factory or (lambda name: build_engine(settings, name))
    audit_log = open_audit_log(settings)
    verifier = TokenVerifier.from_settings(settings) if settings.auth.enabled else None
    registry = ModelRegistry(engines or {}, engine_starter=factory, base_models=_base_model_names(settings))
    background: set[asyncio.Task[Any]] = set()
    state = State()
    cipher = cipher_from_settings(settings)
    fine_tuning = FineTuningServices(settings, registry, cipher)  # the store, files, jobs, hot-load bridge
    metrics = GatewayMetrics(engines=registry.engines, store=lambda: state.get("store"), worker=worker)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if not engines:
            task = asyncio.create_task(_start_default(registry, settings.models.default))
            background.add(task)
            task.add_done_callback(background.discard)
        watch = asyncio.create_task(_watch_engines(registry, on_engine_failed))
        await fine_tuning.start()
        if worker is not None:
            worker.start()
        try:
            yield
        finally:
            watch.cancel()
            if worker is not None:
                await worker.stop()
            await fine_tuning.close()
            for engine in registry.engines():
                await asyncio.to_thread(engine.shutdown)
            audit_log.close()

    state.update(
        {
            "metrics": metrics,
            "settings": settings,
            "data_dir": data_dir,
            "audit_log": audit_log,
            "verifier": verifier,
            "registry": registry,
            "chat": ChatService(registry, settings.limits, metrics),
            "rate_limiter": RateLimiter(settings.limits.requests_per_minute),
            "tenant_limiter": ConcurrencyLimiter(settings.limits.tenant_concurrency),
            "cipher": cipher,
            "store": fine_tuning.store,
            "model_remover": fine_tuning.models.remove,
            "worker": worker,
        }
    )
    config = AppConfig(
        route_handlers=[
            healthz,
            readyz,
            metrics_route(settings),
            ChatController,
            ModelsController,
            list_audit_records,
            FilesController,
            FineTuningController,
        ],
        guards=[authorize, apply_limits],
        dependencies={
            "registry": Provide(lambda: registry, sync_to_thread=False),
            "chat": Provide(lambda: state["chat"], sync_to_thread=False),
            "files": Provide(lambda: fine_tuning.files, sync_to_thread=False),
            "jobs": Provide(lambda: fine_tuning.jobs, sync_to_thread=False),
        },
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[lifespan],
        state=state,
        request_max_body_size=settings.server.max_body_bytes,
        openapi_config=None,
        debug=False,
    )
    app = Litestar.from_config(config)
    return AuditMiddleware(app, audit_log, append=metrics.observing(audit_log.append))


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


async def _start_default(registry: ModelRegistry, name: str) -> None:
    try:
        await registry.start_engine(name)
    except Exception as exc:  # the service keeps answering /healthz; /readyz and chat report 503
        log.error("engine.start_failed", model=name, error_type=type(exc).__name__, error=str(exc)[:200])
