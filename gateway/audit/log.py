"""The append-only, HMAC-chained audit log (JSON Lines), one record per API request: the writer.

This module owns the open file: the writer lock, chaining each record, group commit with fsync, and the
head update.  Beside it: records.py (what a record may hold), chain.py (mac and head primitives),
recovery.py (opening an existing log), pages.py (reading it back), verify.py (the full check).

Design
- Each line is one record: the allowed fields (records.py) plus `seq` (1, 2, ...), `prev` (the previous
  record's mac) and `mac` = HMAC-SHA256(key, canonical JSON of the record without mac).  Editing a field,
  deleting, duplicating or reordering lines breaks a mac, a seq or a prev link (see chain.py, verify.py).
- Cutting lines off the end leaves a valid chain, so the end is anchored outside the log: `<log>.head` holds
  the last seq and mac under its own HMAC, replaced atomically after every append.  A log shorter than its
  head was truncated.  Order on disk: line written + fsync, then head written + fsync + rename; a crash in
  between leaves the head one record behind, which is recognised (that record's prev is the head's mac) and
  repaired on open.  A crash mid-line leaves a torn last line: it was never acknowledged, so it is cut off
  on open, but only after the complete lines agree with the head (cutting a committed line still shows;
  recovery.py).
- Limits, stated plainly: the key lives on the same machine, so whoever holds it can rewrite history, and
  someone who can replace both files with an older copy of both (a rollback) is not caught locally.  Ship
  the head (or the log) to write-once storage or a remote syslog to close that.
- Content never enters: records are filtered through an allow-list of keys and scalar types (records.py);
  anything else (a prompt, a file body, a token) is dropped before it reaches the file.
- Thread-safe with one lock and group commit: `append` returns once its record is durable, and appends
  that arrive during an fsync share the next one (throughput grows with load instead of queueing behind
  one fsync each).  It blocks on fsync, so async callers run it in a worker thread.
- A new log starts with its signed genesis head (seq 0; recovery.py) and a first record saying why the chain
  began (`audit.chain_start`, logged loudly as `audit.chain_started`), so a chain that starts over after its
  files were deleted shows at seq 1 and in the logs.  A missing head beside a non-empty log is damage.
- Fail closed: a failed append (disk full, EIO) marks the log unavailable (`available` is False, `/readyz`
  says "audit": false) and AuditMiddleware refuses requests with 503 until an append succeeds again: the
  app's probe (`probe`, every audit.probe_seconds) appends one `audit.recovered` record saying since when
  the log was unwritable and how many requests were refused meanwhile (`note_refused`).
- Opening a log whose end does not verify raises AuditChainBroken: the gateway fails closed rather than
  extend a chain it cannot vouch for.  `gateway audit restart-chain` (restart.py) archives the damaged files
  as evidence and starts a new chain whose first record names the old head and the damage found.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

from contracts.private_files import ensure_private_dir
from gateway.audit.chain import Head, canonical_json, head_path_for, record_mac, write_head
from gateway.audit.pages import MAX_PAGE, AuditPage, read_audit_page
from gateway.audit.records import OUTCOMES, RECORD_FIELDS, now_rfc3339, sanitize_record
from gateway.audit.recovery import AuditChainBroken, recover
from gateway.core.settings import Settings

__all__ = [
    "MAX_PAGE",
    "OUTCOMES",
    "RECORD_FIELDS",
    "AuditChainBroken",
    "AuditLog",
    "AuditLogBusy",
    "AuditPage",
    "open_audit_log",
    "read_key",
    "sanitize_record",
]

log = structlog.get_logger(__name__)

MIN_KEY_BYTES = 16


class AuditLogBusy(RuntimeError):
    """Another open AuditLog (this process or another) holds the writer lock."""


@dataclass
class _Pending:
    record: dict[str, Any]
    line: bytes
    done: bool = False
    error: OSError | None = None


NEW_CHAIN_REASON = "no audit log or head file was found here: a new chain begins"


class AuditLog:
    """Append-only audit log at `path`, chained with `key` (kept apart from the log, >= 16 bytes).

    `chain_start`: the first record of a new chain (restart.py passes one naming the damaged chain before
    it); None writes the plain `audit.chain_start` record when the log is new.  Given for a log that already
    holds a chain, it raises AuditChainBroken rather than bury it.
    """

    def __init__(self, path: Path | str, key: bytes, *, chain_start: Mapping[str, Any] | None = None) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the audit key must be at least {MIN_KEY_BYTES} bytes")
        self.path = Path(path)
        self.head_path = head_path_for(self.path)
        self._key = key
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []  # chained but not yet on disk
        self._flushing = False
        ensure_private_dir(self.path.parent)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.fchmod(self._fd, 0o600)
            try:
                # Two writers (e.g. uvicorn --workers 2) would fork the chain; the second one stops here.
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AuditLogBusy(f"{self.path} is already open for writing by another process") from None
            self._seq, self._last_mac, self._size = recover(self._fd, self.path, self.head_path, self._key)
        except BaseException:
            os.close(self._fd)
            raise
        self._durable = (self._seq, self._last_mac)
        self._closed = False
        self._broken = False
        self._failing_since: str | None = None  # set by a failed append, cleared by a successful one
        self._refused = 0  # requests refused while failing
        if self._seq == 0:
            self._start_chain(chain_start)
        elif chain_start is not None:
            self.close()
            raise AuditChainBroken(f"{self.path} already holds a chain (seq {self._seq}): not starting one")

    def _start_chain(self, first: Mapping[str, Any] | None) -> None:
        record = dict(first or {"action": "audit.chain_start", "chain_reason": NEW_CHAIN_REASON})
        try:
            written = self.append(record)
        except BaseException:
            self.close()
            raise
        log.warning(
            "audit.chain_started",
            path=str(self.path),
            action=written.get("action"),
            reason=written.get("chain_reason"),
        )

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def available(self) -> bool:
        """False from a failed append until one succeeds again (or for good once the log broke)."""
        return self._failing_since is None and not self._broken and not self._closed

    def mark_failed(self) -> None:
        """An append failed (here or in a caller's wrapper): refuse requests until one succeeds again."""
        with self._cond:
            if self._failing_since is None:
                self._failing_since, self._refused = now_rfc3339(), 0
                log.critical("audit.unavailable", path=str(self.path))

    def note_refused(self) -> None:
        with self._cond:
            self._refused += 1

    def probe(self) -> bool:
        """While unavailable: try to append the `audit.recovered` record; True once the log is writable."""
        with self._cond:
            since, refused = self._failing_since, self._refused
        if since is None:
            return self.available
        try:
            self.append({"action": "audit.recovered", "since": since, "count": refused})
        except (OSError, RuntimeError):
            return False
        log.warning("audit.recovered", since=since, refused=refused)
        return True

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Sanitise, chain and durably write one record; returns it as written (with seq, prev, mac).

        Group commit: callers arriving while a flush is under way queue their lines; the next one to find
        no flush running writes them all with one fsync and one head update.  Order is fixed when the mac
        is computed (under the lock), so the file order always equals the chain order.
        """
        clean = sanitize_record(record)
        with self._cond:
            if self._closed or self._broken:
                raise RuntimeError("the audit log is closed or failed; restart to recover")
            full = {**clean, "seq": self._seq + 1, "prev": self._last_mac}
            full["mac"] = record_mac(self._key, full)
            self._seq, self._last_mac = full["seq"], full["mac"]
            mine = _Pending(full, canonical_json(full) + b"\n")
            self._queue.append(mine)
            while not mine.done:
                if self._flushing:
                    self._cond.wait()
                else:
                    self._flush_locked()
        if mine.error is not None:
            self.mark_failed()
            raise OSError(f"audit record not written: {mine.error}") from mine.error
        if self._failing_since is not None:
            with self._cond:
                self._failing_since = None
        return full

    def _flush_locked(self) -> None:
        """Write every queued line; entered and left holding the lock, released during the I/O."""
        batch, self._queue, self._flushing = self._queue, [], True
        data = b"".join(pending.line for pending in batch)
        last = batch[-1].record
        error: OSError | None = None
        self._cond.release()
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
                os.fsync(self._fd)
            except OSError as exc:
                error = exc
                self._undo_partial_write()
            else:
                try:
                    write_head(self.head_path, self._key, Head(last["seq"], last["mac"]))
                except OSError:
                    # The records are durable; a head one batch behind is recognised on open and by verify.
                    log.error("audit.head_write_failed")
        finally:
            self._cond.acquire()
        if error is None:
            self._size += len(data)
            self._durable = (last["seq"], last["mac"])
            for pending in batch:
                pending.done = True
        else:
            # Everything queued since chained onto the lost batch: fail it too and rewind the chain.
            for pending in (*batch, *self._queue):
                pending.done, pending.error = True, error
            self._queue = []
            self._seq, self._last_mac = self._durable
        self._flushing = False
        self._cond.notify_all()

    def _undo_partial_write(self) -> None:
        # Leave no torn line in the middle of the chain for the next append to follow.
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            self._broken = True
            log.error("audit.write_failed_unrecoverably")

    def read_page(
        self, after_seq: int = 0, limit: int = 100, tenant: str | None = None
    ) -> list[dict[str, Any]]:
        """Records with seq > after_seq (optionally one tenant's), oldest first, at most `limit` (<= 1000)."""
        return self.page(after_seq, limit, tenant).records

    def page(self, after_seq: int = 0, limit: int = 100, tenant: str | None = None) -> AuditPage:
        """Like read_page, plus whether more (matching) records follow.  Blocking file I/O (pages.py)."""
        return read_audit_page(self.path, after_seq, limit, tenant)

    def close(self) -> None:
        with self._cond:
            while self._flushing or self._queue:
                self._cond.wait()
            if not self._closed:
                self._closed = True
                os.close(self._fd)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_key(path: Path) -> bytes:
    key = path.read_bytes()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{path}: the audit key must be at least {MIN_KEY_BYTES} bytes")
    return key


def open_audit_log(settings: Settings) -> AuditLog:
    """The log at <data_dir>/<audit.path> with the key from audit.key_file (see ensure_dev_keys)."""
    path = Path(settings.audit.path)
    if not path.is_absolute():
        path = settings.data_path / path
    return AuditLog(path, read_key(settings.key_path(settings.audit.key_file, "audit.key")))
