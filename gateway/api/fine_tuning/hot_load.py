"""The hot-load bridge: fine-tuned models written by worker processes become servable in this gateway.

Workers add a row to the store's `models` table once an adapter directory is complete on disk (a job's final
adapter, or a checkpoint).  This bridge registers every existing row at start-up (loaded lazily on first use)
and then polls for rows past the last one it saw, a few times a second, loading a new final adapter into its
engine at once so the first chat with it does not wait.  A request naming a model the poll has not seen yet
asks the store directly (`resolve`, the registry's miss hook), so a model is usable the moment its job reads
`succeeded`.  The same poll unregisters models whose rows are gone, so a model deleted through another
gateway on the same data dir stops answering here too within a tick.  Adapters encrypted at rest are
decrypted into a private temporary directory just long enough for the engine to read them (`open_adapter`).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import structlog

from contracts.private_files import ensure_private_dir
from gateway.api.models.registry import ModelEntry, ModelRegistry
from gateway.core.errors import GatewayError
from gateway.security.encryption import Cipher
from gateway.store import ModelRecord, Store

__all__ = ["FineTunedModels"]

log = structlog.get_logger(__name__)


class FineTunedModels:
    def __init__(
        self,
        store: Store,
        registry: ModelRegistry,
        cipher: Cipher,
        data_dir: Path,
        *,
        poll_seconds: float = 0.25,
    ) -> None:
        self.store = store
        self.registry = registry
        self.cipher = cipher
        self.data_dir = data_dir
        self.poll_seconds = poll_seconds
        self._last_seq = 0
        self._known: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def open_adapter(self, path: Path) -> Iterator[Path]:
        """A plaintext copy of an adapter directory (the directory itself when encryption is off)."""
        if not self.cipher.enabled:
            yield path
            return
        plain = Path(tempfile.mkdtemp(prefix="adapter-", dir=ensure_private_dir(self.data_dir / "tmp")))
        try:
            self.cipher.decrypt_tree(path, plain)
            yield plain
        finally:
            shutil.rmtree(plain, ignore_errors=True)

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Register every stored model (loaded on first use), then follow new ones."""
        await self.sync(preload=False)
        self._task = asyncio.create_task(self._follow(), name="finetuned-models")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self.sync(preload=True)
            except Exception as exc:  # a locked or briefly unreadable database: try again next tick
                log.warning("finetuned.poll_failed", error_type=type(exc).__name__)

    async def sync(self, *, preload: bool) -> list[str]:
        """Register models added since the last call, drop those deleted elsewhere; returns the added ids."""
        added = []
        for record in await asyncio.to_thread(self.store.models.since, self._last_seq):
            self._last_seq = max(self._last_seq, record.seq)
            if record.id in self._known:  # registered on demand already (see resolve)
                continue
            if await asyncio.to_thread(self._register, record, preload and record.step is None):
                added.append(record.id)
        if self._known:
            known = set(self._known)  # before reading the store: one registered meanwhile is not "gone"
            stored = await asyncio.to_thread(self.store.models.ids)
            for model_id in known - stored:  # deleted by another gateway sharing the data dir
                self._known.discard(model_id)
                self.registry.unregister(model_id)
                log.info("finetuned.unregistered", model=model_id)
        return added

    def resolve(self, model_id: str) -> None:
        """The registry's miss hook: a model the poll has not picked up yet is registered now (its adapter
        loads on first use), so a job's model is usable the moment the job reads `succeeded`."""
        if not model_id.startswith("ft:") or model_id in self._known:
            return
        record = self.store.models.get(model_id)
        if record is not None:
            self._register(record, preload=False)

    def _register(self, record: ModelRecord, preload: bool) -> bool:
        path = self.data_dir / record.path
        try:
            self.registry.register_adapter(
                record.id,
                base=record.base,
                tenant=record.tenant,
                path=path,
                created=record.created_at,
                preload=preload,
            )
        except (GatewayError, ValueError, OSError) as exc:
            if not preload:
                log.error("finetuned.register_failed", model=record.id, error_type=type(exc).__name__)
                return False
            # the engine is not up yet (or busy loading): keep the model, load it on first use instead
            log.warning("finetuned.preload_failed", model=record.id, error_type=type(exc).__name__)
            return self._register(record, preload=False)
        self._known.add(record.id)
        log.info("finetuned.registered", model=record.id, job_id=record.job_id, preloaded=preload)
        return True

    # -- delete --------------------------------------------------------------------------------------------

    async def remove(self, entry: ModelEntry) -> list[str]:
        """DELETE /v1/models/{id}: forget the model in the store, unload it, and remove its adapter files.
        A job's final model goes with all its checkpoints (a checkpoint alone goes alone).  Returns the ids
        removed."""
        removed = await asyncio.to_thread(self.store.models.delete, entry.id)
        for record in removed:
            self._known.discard(record.id)
            self.registry.unregister(record.id)
            adapter = self.data_dir / record.path
            await asyncio.to_thread(shutil.rmtree, adapter, True)
            with contextlib.suppress(OSError):  # the job's adapters/<job>/ dir, once its last one is gone
                adapter.parent.rmdir()
        if removed:
            log.info("finetuned.deleted", models=len(removed), job_id=removed[0].job_id)
        return [record.id for record in removed]
