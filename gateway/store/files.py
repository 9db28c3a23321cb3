"""The `files` table: uploaded training files and the metrics files jobs produce."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from gateway.store.db import Database
from gateway.store.pages import Page, page

__all__ = ["FileRecord", "FilesRepo"]


@dataclass(frozen=True)
class FileRecord:
    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    path: str  # relative to the data dir
    rows: int | None = None
    format: str | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> FileRecord:
        return cls(
            id=row["id"],
            tenant=row["tenant"],
            filename=row["filename"],
            purpose=row["purpose"],
            bytes=row["bytes"],
            created_at=row["created_at"],
            path=row["path"],
            rows=row["rows"],
            format=row["format"],
        )


class FilesRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, record: FileRecord) -> FileRecord:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO files (id, tenant, filename, purpose, bytes, created_at, path, rows, format)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.tenant,
                    record.filename,
                    record.purpose,
                    record.bytes,
                    record.created_at,
                    record.path,
                    record.rows,
                    record.format,
                ),
            )
        return record

    def get(self, file_id: str, tenant: str | None) -> FileRecord | None:
        """The file if it exists and belongs to `tenant` (None: any tenant, for admins and the worker)."""
        row = self.db.one("SELECT * FROM files WHERE id = ?", (file_id,))
        if row is None or (tenant is not None and row["tenant"] != tenant):
            return None
        return FileRecord.from_row(row)

    def list_page(
        self,
        tenant: str | None,
        *,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10_000,
        newest_first: bool = True,
    ) -> Page[FileRecord]:
        where, params = [], []
        if tenant is not None:
            where.append("tenant = ?")
            params.append(tenant)
        if purpose is not None:
            where.append("purpose = ?")
            params.append(purpose)
        return page(
            self.db,
            "files",
            where,
            params,
            after=after,
            limit=limit,
            newest_first=newest_first,
            convert=FileRecord.from_row,
        )

    def delete(self, file_id: str) -> bool:
        with self.db.transaction() as conn:
            return conn.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0

    def usage(self, tenant: str) -> tuple[int, int]:
        """(files, bytes) a tenant stores, for its quotas."""
        row = self.db.one(
            "SELECT COUNT(*) AS n, COALESCE(SUM(bytes), 0) AS b FROM files WHERE tenant = ?", (tenant,)
        )
        return (int(row["n"]), int(row["b"])) if row is not None else (0, 0)

    def all_paths(self) -> set[str]:
        return {row["path"] for row in self.db.query("SELECT path FROM files")}
