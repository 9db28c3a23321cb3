"""The `models` table: fine-tuned models (final adapters and checkpoints) ready to serve.

A row appears only once its adapter directory is complete on disk, so the gateway, which polls this table
for rows past the last `seq` it saw, never loads a half-written adapter.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from gateway.store.db import Database

__all__ = ["ModelRecord", "ModelsRepo"]


@dataclass(frozen=True)
class ModelRecord:
    id: str
    tenant: str
    base: str
    job_id: str
    path: str  # adapter directory, relative to the data dir
    created_at: int
    step: int | None = None  # None: the job's final model
    seq: int = 0

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ModelRecord:
        return cls(
            id=row["id"],
            tenant=row["tenant"],
            base=row["base"],
            job_id=row["job_id"],
            path=row["path"],
            created_at=row["created_at"],
            step=row["step"],
            seq=row["seq"],
        )


class ModelsRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, record: ModelRecord) -> bool:
        """Insert; False if a model of that name exists already (a resumed job re-saving a checkpoint)."""
        with self.db.transaction() as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO models (id, tenant, base, job_id, step, path, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.tenant,
                    record.base,
                    record.job_id,
                    record.step,
                    record.path,
                    record.created_at,
                ),
            )
            return cursor.rowcount > 0

    def get(self, model_id: str) -> ModelRecord | None:
        row = self.db.one("SELECT * FROM models WHERE id = ?", (model_id,))
        return ModelRecord.from_row(row) if row is not None else None

    def since(self, seq: int) -> list[ModelRecord]:
        """Models added after `seq`, oldest first (the gateway's hot-load poll)."""
        return [
            ModelRecord.from_row(r)
            for r in self.db.query("SELECT * FROM models WHERE seq > ? ORDER BY seq", (seq,))
        ]

    def ids(self) -> set[str]:
        return {row["id"] for row in self.db.query("SELECT id FROM models")}

    def disk_bytes(self, tenant: str, data_dir: Path) -> int:
        """Bytes a tenant's adapter directories take on disk (checkpoint exports and final adapters); a file
        hard-linked into two of them (a final adapter is its last checkpoint's files) counts once."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for row in self.db.query("SELECT path FROM models WHERE tenant = ?", (tenant,)):
            try:
                entries = list(os.scandir(data_dir / row["path"]))
            except OSError:  # removed meanwhile
                continue
            for entry in entries:
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if (info.st_dev, info.st_ino) not in seen:
                    seen.add((info.st_dev, info.st_ino))
                    total += info.st_size
        return total

    def paths(self) -> set[str]:
        """Every model's adapter directory, relative to the data dir."""
        return {row["path"] for row in self.db.query("SELECT path FROM models")}

    def for_job(self, job_id: str) -> list[ModelRecord]:
        return [
            ModelRecord.from_row(r) for r in self.db.query("SELECT * FROM models WHERE job_id = ?", (job_id,))
        ]

    def delete(self, model_id: str) -> list[ModelRecord]:
        """Forget a model; a job's final model takes the job's checkpoints with it (they are its outputs).
        Returns the rows removed (their adapter directories are the caller's to delete) and drops the
        checkpoints table's rows that named them."""
        with self.db.transaction() as conn:
            row = conn.execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchone()
            if row is None:
                return []
            target = ModelRecord.from_row(row)
            if target.step is None:
                rows = conn.execute("SELECT * FROM models WHERE job_id = ?", (target.job_id,)).fetchall()
            else:
                rows = [row]
            removed = [ModelRecord.from_row(r) for r in rows]
            for record in removed:
                conn.execute("DELETE FROM models WHERE id = ?", (record.id,))
                conn.execute("DELETE FROM checkpoints WHERE model = ?", (record.id,))
            return removed
