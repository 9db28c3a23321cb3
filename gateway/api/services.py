"""Every long-lived object the routes use, built once per app: the typed app state.

The app hands each field to Litestar as a dependency of the same name (`registry`, `chat`, `responses`,
`embeddings`, `models`, `files`, `jobs`, `settings`, `metrics`, `audit_log`, `worker`, plus the request's
`principal` and `request_state`), so handlers receive what they need as parameters and nothing reads a
string-keyed dict.  `start`/`close` run in the app's lifespan.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from litestar.connection import ASGIConnection
from litestar.di import Provide

from contracts.blobs import BlobStorage
from gateway.api.chat.service import ChatService
from gateway.api.embeddings.service import EmbeddingEngines, EmbeddingsService
from gateway.api.files.service import FileService
from gateway.api.fine_tuning.hot_load import FineTunedModels
from gateway.api.fine_tuning.service import JobService
from gateway.api.models.registry import ModelRegistry
from gateway.api.models.service import ModelsService
from gateway.api.responses.service import ResponsesService
from gateway.audit.log import AuditLog
from gateway.auth.guards import provide_principal
from gateway.auth.quotas import Quotas
from gateway.core.request_state import RequestState, request_state
from gateway.core.settings import Settings
from gateway.core.worker_supervisor import WorkerSupervisor
from gateway.engine.factory import EmbeddingEngineFactory, build_embedding_engine
from gateway.observability.metrics import GatewayMetrics
from gateway.security.encryption import Cipher
from gateway.store import Store

log = structlog.get_logger(__name__)

__all__ = ["Services"]


@dataclass(frozen=True)
class Services:
    settings: Settings
    registry: ModelRegistry
    chat: ChatService
    responses: ResponsesService  # POST /v1/responses, answered through `chat`
    embeddings: EmbeddingsService
    models: ModelsService
    files: FileService
    jobs: JobService
    fine_tuned: FineTunedModels  # the hot-load bridge: store rows -> servable adapters
    store: Store
    metrics: GatewayMetrics
    audit_log: AuditLog
    worker: WorkerSupervisor | None
    quotas: Quotas

    @classmethod
    def build(
        cls,
        settings: Settings,
        registry: ModelRegistry,
        *,
        cipher: Cipher,
        audit_log: AuditLog,
        worker: WorkerSupervisor | None,
        embedding_engine_factory: EmbeddingEngineFactory | None = None,
    ) -> Services:
        data_dir = settings.data_path
        store = Store.open(data_dir)
        blobs = BlobStorage(cipher, data_dir)
        fine_tuned = FineTunedModels(store, registry, cipher, data_dir)
        registry.adapter_opener = fine_tuned.open_adapter
        registry.on_miss = fine_tuned.resolve
        metrics = GatewayMetrics(engines=registry.engines, store=lambda: store, worker=worker)
        quotas = Quotas(settings.quotas)
        chat = ChatService(registry, settings.limits, metrics, tokens=quotas.tokens)
        return cls(
            settings=settings,
            registry=registry,
            chat=chat,
            responses=ResponsesService(chat),
            embeddings=EmbeddingsService(
                registry,
                EmbeddingEngines(
                    embedding_engine_factory or (lambda name: build_embedding_engine(settings, name))
                ),
                max_inputs=settings.embeddings.max_inputs,
            ),
            models=ModelsService(registry, fine_tuned.remove),
            files=FileService(
                store,
                blobs,
                max_upload_bytes=settings.limits.max_upload_bytes,
                max_train_rows=settings.finetune.max_train_rows,
                max_record_bytes=settings.finetune.max_record_bytes,
                quotas=quotas,
            ),
            jobs=JobService(
                store,
                blobs,
                registry,
                quotas=quotas,
                max_lora_rank=settings.finetune.max_lora_rank,
                max_checkpoints=settings.finetune.max_checkpoints_per_job,
            ),
            fine_tuned=fine_tuned,
            store=store,
            metrics=metrics,
            audit_log=audit_log,
            worker=worker,
            quotas=quotas,
        )

    def dependencies(self) -> dict[str, Provide | Callable[..., Any]]:
        provided: dict[str, Provide | Callable[..., Any]] = {
            field.name: Provide(_constant(getattr(self, field.name)), sync_to_thread=False)
            for field in dataclasses.fields(self)
        }
        provided["principal"] = Provide(provide_principal, sync_to_thread=False)
        provided["request_state"] = Provide(_provide_request_state, sync_to_thread=False)
        return provided

    async def start(self) -> None:
        await asyncio.to_thread(self.files.sweep, self.settings.privacy.tmp_max_age_seconds)
        if self.settings.privacy.tmp_sweep_seconds > 0:
            sweeper = asyncio.get_running_loop().create_task(self._sweep_periodically())
            object.__setattr__(self, "_sweeper", sweeper)  # a task, not a dependency: kept off the fields
        await self.jobs.start()
        await self.fine_tuned.start()
        if self.worker is not None:
            self.worker.start()

    async def _sweep_periodically(self) -> None:
        """data/tmp holds plaintext while an upload is staged or an adapter decrypted: sweep it on a timer
        too, not only at start (a gateway may run for months)."""
        privacy = self.settings.privacy
        while True:
            await asyncio.sleep(privacy.tmp_sweep_seconds)
            try:
                removed = await asyncio.to_thread(self.files.sweep, privacy.tmp_max_age_seconds)
            except Exception as exc:  # a sweep that fails once must not stop the next
                log.warning("files.sweep_failed", error_type=type(exc).__name__)
                continue
            if removed:
                log.info("files.swept", removed=removed)

    async def close(self) -> None:
        sweeper = getattr(self, "_sweeper", None)
        if sweeper is not None:
            sweeper.cancel()
        if self.worker is not None:
            await self.worker.stop()
        await self.fine_tuned.close()
        await self.jobs.close()
        await self.embeddings.engines.close()
        self.store.close()


def _constant(value: Any) -> Any:
    def provide() -> Any:
        return value

    return provide


def _provide_request_state(request: ASGIConnection[Any, Any, Any, Any]) -> RequestState:
    return request_state(request.scope)
