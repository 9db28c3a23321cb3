"""The `jobs` table: the fine-tuning queue and every job's state.

Status moves validating_files -> queued -> running -> succeeded | failed | cancelled, and every move is one
conditional UPDATE (`... WHERE status IN (...)`), so a cancel racing a worker's finish has exactly one winner.
A worker owns a running job through `worker_id` and a lease it renews (`heartbeat`); a running job whose lease
ran out lost its worker and may be claimed again, by any worker.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.store.db import Database
from gateway.store.pages import Page, page

__all__ = ["ACTIVE", "FINISHED", "JobRecord", "JobsRepo"]

FINISHED = ("succeeded", "failed", "cancelled")
ACTIVE = ("validating_files", "queued", "running")
_JSON_COLUMNS = ("metadata", "hyperparameters", "error", "result_files")


@dataclass(frozen=True)
class JobRecord:
    id: str
    tenant: str
    subject: str
    model: str
    training_file: str
    seed: int
    hyperparameters: dict[str, Any]
    status: str
    created_at: int
    validation_file: str | None = None
    suffix: str | None = None
    metadata: dict[str, str] | None = None
    error: dict[str, Any] | None = None
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    result_files: list[str] = field(default_factory=list)
    started_at: int | None = None
    finished_at: int | None = None
    estimated_finish: int | None = None
    worker_id: str | None = None
    lease_until: float | None = None
    attempts: int = 0

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRecord:
        values = {key: row[key] for key in row.keys() if key != "seq"}  # noqa: SIM118 - sqlite3.Row
        for key in _JSON_COLUMNS:
            if values[key] is not None:
                values[key] = json.loads(values[key])
        return cls(**values)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


def _encode(key: str, value: Any) -> Any:
    return json.dumps(value) if key in _JSON_COLUMNS and value is not None else value


class JobsRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, job: JobRecord) -> JobRecord:
        columns = [k for k in job.__dataclass_fields__ if k not in ("worker_id", "lease_until", "attempts")]
        with self.db.transaction() as conn:
            conn.execute(
                f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",  # noqa: S608
                [_encode(k, getattr(job, k)) for k in columns],
            )
        return job

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        """The job if it exists and belongs to `tenant` (None: any tenant)."""
        row = self.db.one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if row is None or (tenant is not None and row["tenant"] != tenant):
            return None
        return JobRecord.from_row(row)

    def list_page(
        self,
        tenant: str | None,
        *,
        after: str | None = None,
        limit: int = 20,
        metadata: dict[str, str] | None = None,
    ) -> Page[JobRecord]:
        """Newest first, as OpenAI lists jobs; `metadata` keeps jobs whose metadata has every pair."""
        where: list[str] = []
        params: list[Any] = []
        if tenant is not None:
            where.append("tenant = ?")
            params.append(tenant)
        for key, value in (metadata or {}).items():
            where.append("json_extract(metadata, ?) = ?")
            params += [f'$."{key}"', value]
        return page(
            self.db,
            "jobs",
            where,
            params,
            after=after,
            limit=limit,
            newest_first=True,
            convert=JobRecord.from_row,
        )

    def with_status(self, statuses: Iterable[str]) -> list[JobRecord]:
        wanted = list(statuses)
        rows = self.db.query(
            f"SELECT * FROM jobs WHERE status IN ({', '.join('?' for _ in wanted)}) ORDER BY seq",  # noqa: S608
            wanted,
        )
        return [JobRecord.from_row(r) for r in rows]

    def update(
        self,
        job_id: str,
        *,
        status_in: Iterable[str] | None = None,
        worker_id: str | None = None,
        **fields: Any,
    ) -> bool:
        """Set `fields` if the job is in one of `status_in` (and owned by `worker_id`); False if not."""
        sets = ", ".join(f"{key} = ?" for key in fields)
        sql = f"UPDATE jobs SET {sets} WHERE id = ?"  # noqa: S608 - keys are our column names
        params: list[Any] = [_encode(k, v) for k, v in fields.items()] + [job_id]
        if status_in is not None:
            wanted = list(status_in)
            sql += f" AND status IN ({', '.join('?' for _ in wanted)})"
            params += wanted
        if worker_id is not None:
            sql += " AND worker_id = ?"
            params.append(worker_id)
        with self.db.transaction() as conn:
            return conn.execute(sql, params).rowcount > 0

    def waiting(self, tenant: str) -> int:
        """A tenant's jobs not yet started (validating_files or queued), for its quota."""
        row = self.db.one(
            "SELECT COUNT(*) AS n FROM jobs WHERE tenant = ? AND status IN ('validating_files', 'queued')",
            (tenant,),
        )
        return int(row["n"]) if row is not None else 0

    # -- the worker's side ---------------------------------------------------------------------------------

    def claim(
        self, worker_id: str, *, now: float, lease_seconds: float, tenant_running: int = 0
    ) -> JobRecord | None:
        """Atomically take the oldest queued job, or a running one whose worker stopped renewing its lease
        (or is this worker's own predecessor: same id, so certainly dead).  Two workers never get the same
        job: the SELECT and UPDATE run under SQLite's single write lock (BEGIN IMMEDIATE).
        `tenant_running` > 0 (quotas.running_jobs): a queued job waits while its tenant already has that
        many running jobs held by a live lease."""
        with self.db.transaction() as conn:
            row = conn.execute(
                "SELECT id FROM jobs AS j WHERE (status = 'queued' AND (? <= 0 OR"
                "  (SELECT COUNT(*) FROM jobs AS r WHERE r.tenant = j.tenant AND r.status = 'running'"
                "   AND r.lease_until >= ? AND r.worker_id != ?) < ?))"
                " OR (status = 'running' AND (lease_until IS NULL OR lease_until < ? OR worker_id = ?))"
                " ORDER BY seq LIMIT 1",
                (tenant_running, now, worker_id, tenant_running, now, worker_id),
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET status = 'running', worker_id = ?, lease_until = ?, attempts = attempts + 1,"
                " started_at = COALESCE(started_at, ?) WHERE id = ?",
                (worker_id, now + lease_seconds, int(now), row["id"]),
            )
            claimed = conn.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
        return JobRecord.from_row(claimed)

    def heartbeat(self, job_id: str, worker_id: str, *, lease_until: float, **progress: Any) -> bool:
        """Renew the lease (and set `progress` fields such as estimated_finish); False when the job is no
        longer this worker's running job (cancelled, or taken over)."""
        return self.update(
            job_id, status_in=("running",), worker_id=worker_id, lease_until=lease_until, **progress
        )

    def release(self, job_id: str, worker_id: str) -> bool:
        """A worker shutting down cleanly hands its running job back to the queue (it resumes later, and the
        interruption does not count as a failed attempt)."""
        with self.db.transaction() as conn:
            return (
                conn.execute(
                    "UPDATE jobs SET status = 'queued', worker_id = NULL, lease_until = NULL,"
                    " estimated_finish = NULL,"
                    " attempts = MAX(attempts - 1, 0) WHERE id = ? AND status = 'running' AND worker_id = ?",
                    (job_id, worker_id),
                ).rowcount
                > 0
            )
