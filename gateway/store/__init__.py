"""The SQLite store in the data dir: files, fine-tuning jobs, their events and checkpoints, fine-tuned models.

store = Store.open(data_dir)        # one per process (the gateway, each worker)
with store.db.transaction():        # several repositories in one atomic write
    store.jobs.update(...); store.events.add(...)
"""

from __future__ import annotations

from pathlib import Path

from gateway.store.checkpoints import CheckpointRecord, CheckpointsRepo
from gateway.store.db import Database, StoreError, new_id
from gateway.store.events import EventRecord, EventsRepo
from gateway.store.files import FileRecord, FilesRepo
from gateway.store.jobs import ACTIVE, FINISHED, JobRecord, JobsRepo
from gateway.store.models import ModelRecord, ModelsRepo
from gateway.store.pages import Page

__all__ = [
    "ACTIVE",
    "FINISHED",
    "CheckpointRecord",
    "EventRecord",
    "FileRecord",
    "JobRecord",
    "ModelRecord",
    "Page",
    "Store",
    "StoreError",
    "new_id",
]


class Store:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.files = FilesRepo(db)
        self.jobs = JobsRepo(db)
        self.events = EventsRepo(db)
        self.checkpoints = CheckpointsRepo(db)
        self.models = ModelsRepo(db)

    @classmethod
    def open(cls, data_dir: Path) -> Store:
        return cls(Database.open(data_dir))

    def close(self) -> None:
        self.db.close()

    def usage(self, tenant: str, data_dir: Path) -> tuple[int, int]:
        """(files, bytes) a tenant keeps, for its quotas: its files (uploads, results) by count, and as bytes
        those files plus what its jobs' adapters take on disk (checkpoint exports, final adapters)."""
        files, stored = self.files.usage(tenant)
        return files, stored + self.models.disk_bytes(tenant, data_dir)
