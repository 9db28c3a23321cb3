"""The SQLite database under the data dir: one connection per process, WAL, schema migrations.

The gateway and the fine-tuning worker are separate processes (possibly on separate machines sharing the data
dir), each with its own `Database`.  WAL lets readers run beside the one writer; every write is a short
`BEGIN IMMEDIATE` transaction, so two processes never deadlock upgrading a read lock, and `busy_timeout` lets
the loser wait instead of failing.  Within a process the connection is owned by this object: a re-entrant
lock serializes its users (the event loop, `asyncio.to_thread` workers, the worker's heartbeat thread), and a
transaction opened inside another joins it, so a repository method composes into a larger atomic write.

Migrations are a list of SQL scripts; `PRAGMA user_version` records how many ran.  They run inside one
`BEGIN IMMEDIATE`, so processes starting together migrate once.
"""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import string
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from contracts.private_files import ensure_private_dir

__all__ = ["DB_FILENAME", "Database", "StoreError", "new_id"]

DB_FILENAME = "gateway.db"

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE files (
        seq          INTEGER PRIMARY KEY AUTOINCREMENT,
        id           TEXT NOT NULL UNIQUE,
        tenant       TEXT NOT NULL,
        filename     TEXT NOT NULL,
        purpose      TEXT NOT NULL,
        bytes        INTEGER NOT NULL,
        created_at   INTEGER NOT NULL,
        path         TEXT NOT NULL,          -- relative to the data dir
        rows         INTEGER,                -- training examples (purpose fine-tune)
        format       TEXT                    -- chat | alpaca (purpose fine-tune)
    );
    CREATE INDEX files_by_tenant ON files (tenant, seq);

    CREATE TABLE jobs (
        seq              INTEGER PRIMARY KEY AUTOINCREMENT,
        id               TEXT NOT NULL UNIQUE,
        tenant           TEXT NOT NULL,
        subject          TEXT NOT NULL,
        model            TEXT NOT NULL,
        training_file    TEXT NOT NULL,
        validation_file  TEXT,
        suffix           TEXT,
        seed             INTEGER NOT NULL,
        metadata         TEXT,                -- JSON object or NULL
        hyperparameters  TEXT NOT NULL,       -- JSON: every training setting, resolved
        status           TEXT NOT NULL,
        error            TEXT,                -- JSON {code, message, param} or NULL
        fine_tuned_model TEXT,
        trained_tokens   INTEGER,
        result_files     TEXT NOT NULL DEFAULT '[]',
        created_at       INTEGER NOT NULL,
        started_at       INTEGER,
        finished_at      INTEGER,
        estimated_finish INTEGER,
        worker_id        TEXT,
        lease_until      REAL,                -- unix time; a running job past it has lost its worker
        attempts         INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_by_tenant ON jobs (tenant, seq);
    CREATE INDEX jobs_by_status ON jobs (status, seq);

    CREATE TABLE job_events (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        id          TEXT NOT NULL UNIQUE,
        job_id      TEXT NOT NULL REFERENCES jobs (id),
        created_at  INTEGER NOT NULL,
        level       TEXT NOT NULL,
        type        TEXT NOT NULL,
        message     TEXT NOT NULL,
        data        TEXT                      -- JSON object or NULL
    );
    CREATE INDEX job_events_by_job ON job_events (job_id, seq);

    CREATE TABLE checkpoints (
        seq          INTEGER PRIMARY KEY AUTOINCREMENT,
        id           TEXT NOT NULL UNIQUE,
        job_id       TEXT NOT NULL REFERENCES jobs (id),
        step         INTEGER NOT NULL,
        created_at   INTEGER NOT NULL,
        metrics      TEXT NOT NULL,           -- JSON object
        model        TEXT NOT NULL,           -- ft:...:ckpt-step-N
        UNIQUE (job_id, step)
    );

    CREATE TABLE models (
        seq          INTEGER PRIMARY KEY AUTOINCREMENT,
        id           TEXT NOT NULL UNIQUE,    -- the model name clients use
        tenant       TEXT NOT NULL,
        base         TEXT NOT NULL,
        job_id       TEXT NOT NULL REFERENCES jobs (id),
        step         INTEGER,                 -- NULL: the job's final adapter; N: checkpoint at step N
        path         TEXT NOT NULL,           -- adapter directory, relative to the data dir
        created_at   INTEGER NOT NULL
    );
    """,
)


class StoreError(RuntimeError):
    """The database cannot be opened or migrated (newer schema, corrupt file, unwritable dir)."""


class Database:
    """One SQLite connection for this process; `transaction()` for writes, `query()`/`one()` for reads."""

    def __init__(self, path: Path, *, busy_timeout_ms: int = 10_000) -> None:
        ensure_private_dir(path.parent)
        self.path = path
        try:
            conn = sqlite3.connect(
                str(path), isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the database {path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        path.chmod(0o600)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(
                f"the database {path} cannot use WAL (journal_mode={mode}); is it on a network share?"
            )
        conn.execute("PRAGMA synchronous = FULL")  # job state must survive a power cut, not only a crash
        conn.execute("PRAGMA foreign_keys = ON")
        self._conn = conn
        self._lock = threading.RLock()
        self._depth = 0
        self._migrate()

    @classmethod
    def open(cls, data_dir: Path) -> Database:
        return cls(Path(data_dir) / DB_FILENAME)

    def _migrate(self) -> None:
        with self.transaction() as conn:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"the database {self.path} has schema version {version}, newer than this program "
                    f"({len(MIGRATIONS)}); upgrade the program"
                )
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in _statements(script):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE); nested calls join the outermost one."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._conn
                finally:
                    self._depth -= 1
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")
            finally:
                self._depth = 0

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self._conn.execute(sql, params).fetchone()
            return row

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (executescript would commit our transaction)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line.split("--", 1)[0] + ("\n" if "--" in line else "")
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    if current.strip():
        statements.append(current.strip())
    return statements


def new_id(prefix: str) -> str:
    """An opaque id like OpenAI's: `file-`, `ftjob-`, `ftevent-`, `ftckpt-` + 24 random letters and digits."""
    alphabet = string.ascii_letters + string.digits
    return prefix + "".join(secrets.choice(alphabet) for _ in range(24))
