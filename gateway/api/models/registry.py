"""Which model ids exist, who may see them, and which engine (and adapter) answers each.

Base models (chat and embedding models) are configured and visible to every caller with `models:read`; a chat
route asked for an embedding model, or the embeddings route for a chat model, is a 400 on `model`. Fine-tuned
models belong to one tenant: another tenant gets 404 for them, exactly as if they did not exist. An adapter is
loaded into its engine on first use (and again after LRU eviction) under a per-name lock, so concurrent first
requests load it once and other models are never blocked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from gateway.core.errors import InvalidRequest, NotFound
from gateway.core.principal import Principal
from gateway.engine.base import Engine

__all__ = ["AdapterOpener", "ModelEntry", "ModelRegistry"]

log = structlog.get_logger(__name__)

# Stored adapter directory -> a plaintext directory the engine can read (decrypts when encrypted at rest).
AdapterOpener = Callable[[Path], AbstractContextManager[Path]]


@dataclass(frozen=True)
class ModelEntry:
    id: str
    created: int
    owned_by: str
    base: str
    adapter_path: Path | None = None
    tenant: str | None = None  # None: a base model, visible to all
    kind: Literal["chat", "embedding"] = "chat"  # which routes serve it

    @property
    def is_base(self) -> bool:
        return self.adapter_path is None


def _not_found(model_id: str) -> NotFound:
    return NotFound(
        f"The model '{model_id}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


class ModelRegistry:
    def __init__(
        self,
        engines: dict[str, Engine],
        *,
        engine_starter: Callable[[str], Engine] | None = None,
        base_models: list[str] | None = None,
        adapter_opener: AdapterOpener | None = None,
        embedding_models: list[str] | None = None,
    ) -> None:
        """`engines`: started engines by base model name.  `base_models`: every configured base model (some
        may be started lazily by `engine_starter` on first use).  `embedding_models`: listed after them,
        served by the embeddings service (gateway/api/embeddings/), never by a chat engine."""
        self._engines = dict(engines)
        self._engine_starter = engine_starter
        now = int(time.time())
        self._entries: dict[str, ModelEntry] = {
            name: ModelEntry(id=name, created=now, owned_by="system", base=name)
            for name in (base_models or list(engines))
        }
        for name in embedding_models or []:
            self._entries.setdefault(
                name, ModelEntry(id=name, created=now, owned_by="system", base=name, kind="embedding")
            )
        self._load_locks: dict[str, asyncio.Lock] = {}
        self.adapter_opener = adapter_opener
        # Called with an unknown model id before answering 404: lets the fine-tuning store register a model
        # a worker finished a moment ago, so it is usable the instant its job reads `succeeded`.
        self.on_miss: Callable[[str], None] | None = None

    # -- listing -----------------------------------------------------------------------------------------

    def visible(self, principal: Principal) -> list[ModelEntry]:
        return [e for e in self._entries.values() if self._can_see(e, principal)]

    def embedding_model(self, model_id: str, principal: Principal) -> ModelEntry:
        """The entry of an embedding model; a chat model here is a 400 that says so."""
        entry = self.get(model_id, principal)
        if entry.kind != "embedding":
            raise InvalidRequest(
                f"The model '{model_id}' is a chat model and does not serve embeddings; use one of: "
                f"{', '.join(e.id for e in self._entries.values() if e.kind == 'embedding') or '(none)'}.",
                param="model",
                code="model_not_supported",
            )
        return entry

    def get(self, model_id: str, principal: Principal) -> ModelEntry:
        entry = self._entries.get(model_id)
        if entry is None and self.on_miss is not None:
            self.on_miss(model_id)
            entry = self._entries.get(model_id)
        if entry is None or not self._can_see(entry, principal):
            raise _not_found(model_id)
        return entry

    @staticmethod
    def _can_see(entry: ModelEntry, principal: Principal) -> bool:
        return entry.tenant is None or entry.tenant == principal.tenant or principal.is_admin

    # -- fine-tuned models -------------------------------------------------------------------------------

    def register_adapter(
        self, model_id: str, *, base: str, tenant: str, path: Path, created: int, preload: bool = True
    ) -> ModelEntry:
        """Make a fine-tuned model servable now (hot-load), without a restart."""
        if base not in self._entries or not self._entries[base].is_base or self._entries[base].kind != "chat":
            raise InvalidRequest(f"base model {base!r} is not configured on this server", param="model")
        entry = ModelEntry(
            id=model_id, created=created, owned_by=tenant, base=base, adapter_path=path, tenant=tenant
        )
        self._entries[model_id] = entry
        engine = self._engines.get(base)
        if preload and engine is not None:
            self._load_adapter(engine, model_id, path)
        log.info("registry.adapter_registered", model=model_id)
        return entry

    def unregister(self, model_id: str) -> None:
        entry = self._entries.get(model_id)
        if entry is None or entry.is_base:
            return
        del self._entries[model_id]
        engine = self._engines.get(entry.base)
        if engine is not None:
            engine.remove_adapter(model_id)

    # -- serving -----------------------------------------------------------------------------------------

    async def engine_for(self, model_id: str, principal: Principal) -> tuple[Engine, ModelEntry]:
        """The engine that answers `model_id`, with its adapter loaded."""
        entry = self.get(model_id, principal)
        if entry.kind == "embedding":
            raise InvalidRequest(
                f"The model '{model_id}' is an embedding model: it serves POST /v1/embeddings, not "
                "completions.",
                param="model",
                code="model_not_supported",
            )
        engine = await self.start_engine(entry.base)
        if entry.adapter_path is not None and not engine.has_adapter(entry.id):
            lock = self._load_locks.setdefault(entry.id, asyncio.Lock())
            async with lock:
                if not engine.has_adapter(entry.id):
                    await asyncio.to_thread(self._load_adapter, engine, entry.id, entry.adapter_path)
        return engine, entry

    def _load_adapter(self, engine: Engine, name: str, path: Path) -> None:
        if self.adapter_opener is None:
            engine.add_adapter(name, path)
            return
        with self.adapter_opener(path) as plain:
            engine.add_adapter(name, plain)

    async def start_engine(self, base: str) -> Engine:
        """The engine for a base model, started now if it is not running yet."""
        engine = self._engines.get(base)
        if engine is not None:
            return engine
        if self._engine_starter is None:
            raise _not_found(base)
        lock = self._load_locks.setdefault(f"engine:{base}", asyncio.Lock())
        async with lock:
            if base not in self._engines:
                self._engines[base] = await asyncio.to_thread(self._engine_starter, base)
        return self._engines[base]

    def engines(self) -> list[Engine]:
        return list(self._engines.values())

    def default_engine(self) -> Engine | None:
        return next(iter(self._engines.values()), None)
