"""Opening an existing audit log: find where its chain ends, check that end, and repair what a crash left.

Kept apart from the writer (log.py) because it runs once, before the first append, and holds the rules
for what a crash may leave behind: a head one batch behind the log (recognised and rewritten) and a torn
last line (never acknowledged, so cut off, but only once the complete lines agree with the head).  A quick
look at the last line decides the common case; anything it cannot vouch for gets the full verify_chain
walk, and an end that does not verify raises AuditChainBroken: the gateway fails closed.

A new log gets its genesis head (seq 0) here, before its first record; from then on a missing head file is
damage, never a crash leftover.  Only an empty log with no head is new (nothing was ever recorded in it); the
writer (log.py) then opens the chain with a record saying why it began.
"""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path
from typing import Any

import structlog

from gateway.audit.chain import GENESIS, Head, HeadInvalid, head_problem, read_head, record_mac, write_head
from gateway.audit.verify import format_result, verify_chain

__all__ = ["RESTART_HINT", "AuditChainBroken", "recover"]

log = structlog.get_logger(__name__)

MAX_TAIL_SCAN = 1 << 20  # records are a few hundred bytes; a longer tail is not ours
RESTART_HINT = (
    ". Keep the files as evidence: `gateway audit restart-chain` archives them and starts a new chain "
    "that names the damage"
)


class AuditChainBroken(RuntimeError):
    """The existing log does not verify at its end; the gateway will not extend it."""


def recover(fd: int, path: Path, head_path: Path, key: bytes) -> tuple[int, str, int]:
    """(last seq, last mac, end of the complete lines) of the log open on `fd`, its crash leftovers repaired.

    The caller holds the writer lock on `fd`, so nothing appends meanwhile.
    """
    try:
        head = read_head(head_path, key)
    except HeadInvalid as exc:
        raise AuditChainBroken(f"{head_path}: {exc}{RESTART_HINT}") from None
    size = os.fstat(fd).st_size
    if head is None:
        if size:
            raise AuditChainBroken(
                f"{head_path} is missing: every log is created with its head, so it was deleted and records "
                f"cut off the end of {path} would go unnoticed{RESTART_HINT}"
            )
        write_head(head_path, key, Head(0, GENESIS))  # the genesis head: a new, empty chain
        return 0, GENESIS, 0
    line, complete_end = _last_complete_line(fd, size)
    last = _verified_record(line, key) if line is not None else None
    last_seq, last_mac = (last["seq"], last["mac"]) if last else (0, GENESIS)
    known = {last_seq: last_mac, last_seq - 1: last["prev"]} if last else {}
    if (line is not None and last is None) or head_problem(
        head, last_seq, known.get(head.seq) if head else None
    ):
        # The quick look at the end failed (or could not decide): walk the whole chain for the verdict.
        result = verify_chain(path, key, head_path=head_path)
        if not result.ok:
            raise AuditChainBroken(f"{path}: {format_result(result)}{RESTART_HINT}")
    if complete_end < size:
        # A torn line from a crash mid-write; it was never acknowledged to anyone.
        log.warning("audit.torn_tail_removed", bytes=size - complete_end)
        os.ftruncate(fd, complete_end)
        os.fsync(fd)
    if last_seq:
        write_head(head_path, key, Head(last_seq, last_mac))
    return last_seq, last_mac, complete_end


def _last_complete_line(fd: int, size: int, block: int = 65536) -> tuple[bytes | None, int]:
    """(the last newline-terminated line without its newline, or None; the offset just past it)."""
    start = size
    while start > 0 and size - start < MAX_TAIL_SCAN:
        start = max(0, start - block)
        buf = os.pread(fd, size - start, start)
        end = buf.rfind(b"\n")
        if end < 0:
            continue
        begin = buf.rfind(b"\n", 0, end) + 1
        if begin > 0 or start == 0:
            return buf[begin:end], start + end + 1
    if start > 0:
        raise AuditChainBroken("the audit log ends in an over-long line")
    return None, 0


def _verified_record(line: bytes, key: bytes) -> dict[str, Any] | None:
    """The record on `line` if it parses and its mac verifies, else None."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("seq"), int):
        return None
    mac, prev = record.get("mac"), record.get("prev")
    if not isinstance(mac, str) or not isinstance(prev, str):
        return None
    return record if hmac.compare_digest(mac, record_mac(key, record)) else None
