"""The `checkpoints` table: adapters saved during a job, each also servable as `<model>:ckpt-step-N`."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from gateway.store.db import Database
from gateway.store.pages import Page, page

__all__ = ["CheckpointRecord", "CheckpointsRepo"]


@dataclass(frozen=True)
class CheckpointRecord:
    id: str
    job_id: str
    step: int
    created_at: int
    metrics: dict[str, Any]
    model: str

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> CheckpointRecord:
        return cls(
            id=row["id"],
            job_id=row["job_id"],
            step=row["step"],
            created_at=row["created_at"],
            metrics=json.loads(row["metrics"]),
            model=row["model"],
        )


class CheckpointsRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, record: CheckpointRecord) -> bool:
        """Insert; False if the job already has a checkpoint at that step (a resumed job saving it again)."""
        with self.db.transaction() as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO checkpoints (id, job_id, step, created_at, metrics, model)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.job_id,
                    record.step,
                    record.created_at,
                    json.dumps(record.metrics),
                    record.model,
                ),
            )
            return cursor.rowcount > 0

    def list_page(self, job_id: str, *, after: str | None = None, limit: int = 10) -> Page[CheckpointRecord]:
        return page(
            self.db,
            "checkpoints",
            ["job_id = ?"],
            [job_id],
            after=after,
            limit=limit,
            newest_first=True,
            convert=CheckpointRecord.from_row,
        )
