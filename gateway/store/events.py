"""The `job_events` table: what happened to a job, newest first when listed (as OpenAI lists them)."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Literal

from gateway.store.db import Database, new_id
from gateway.store.pages import Page, page

__all__ = ["EventLevel", "EventRecord", "EventType", "EventsRepo"]

EventLevel = Literal["info", "warn", "error"]
EventType = Literal["message", "metrics"]


@dataclass(frozen=True)
class EventRecord:
    id: str
    job_id: str
    created_at: int
    level: EventLevel
    type: EventType
    message: str
    data: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> EventRecord:
        data = json.loads(row["data"]) if row["data"] is not None else None
        return cls(
            id=row["id"],
            job_id=row["job_id"],
            created_at=row["created_at"],
            level=row["level"],
            type=row["type"],
            message=row["message"],
            data=data,
        )


class EventsRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(
        self,
        job_id: str,
        message: str,
        *,
        level: EventLevel = "info",
        type: EventType = "message",
        data: dict[str, Any] | None = None,
        created_at: int | None = None,
    ) -> EventRecord:
        event = EventRecord(
            id=new_id("ftevent-"),
            job_id=job_id,
            created_at=created_at or int(time.time()),
            level=level,
            type=type,
            message=message,
            data=data,
        )
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO job_events (id, job_id, created_at, level, type, message, data)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    event.id,
                    job_id,
                    event.created_at,
                    level,
                    type,
                    message,
                    json.dumps(data) if data is not None else None,
                ),
            )
        return event

    def list_page(self, job_id: str, *, after: str | None = None, limit: int = 20) -> Page[EventRecord]:
        return page(
            self.db,
            "job_events",
            ["job_id = ?"],
            [job_id],
            after=after,
            limit=limit,
            newest_first=True,
            convert=EventRecord.from_row,
        )
