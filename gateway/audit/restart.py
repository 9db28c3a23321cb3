"""`gateway audit restart-chain`: the way back from a damaged audit log, without erasing anything.

A log whose end does not verify stops the gateway (it will not extend a chain it cannot vouch for).  This
moves the damaged log and its head file, as they are, into `<audit dir>/archive/<UTC time>/` (a rename: the
bytes are kept as evidence, with the verdict beside them in `verdict.txt`), then starts a new chain at the
old path whose first record, `audit.chain_restart`, names what came before: the old head (seq and mac, when
its head file still verifies), how many records verified and the mac of the last one, the damage found and
the archive.  The service must be stopped: the log's writer lock is taken first, so a running gateway makes
it refuse.  An intact chain is never restarted.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from contracts.private_files import ensure_private_dir, fsync_dir, write_private_file
from gateway.audit.chain import HeadInvalid, head_path_for, read_head
from gateway.audit.log import AuditLog, AuditLogBusy
from gateway.audit.verify import format_result, verify_chain

__all__ = ["ChainIntact", "Restarted", "restart_chain"]

log = structlog.get_logger(__name__)


class ChainIntact(ValueError):
    """The chain verifies: there is nothing to restart (restarting would only break its continuity)."""


@dataclass(frozen=True)
class Restarted:
    archive: Path  # the directory now holding the damaged log, its head file and verdict.txt
    damage: str  # the verdict that was found, as `gateway audit verify` prints it
    first_record: dict[str, Any]  # the new chain's seq 1


def restart_chain(path: Path, key: bytes, *, now: datetime | None = None) -> Restarted:
    """Archive the damaged log at `path` (and its head) and start a new chain there; see the module doc.

    Raises NoAuditLog when nothing was ever recorded there (the gateway starts a chain by itself),
    ChainIntact when the chain verifies, AuditLogBusy while a gateway holds the log.
    """
    head_path = head_path_for(path)
    fd = os.open(path, os.O_RDONLY) if path.exists() else None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AuditLogBusy(f"{path} is open by a running gateway: stop the service first") from None
        result = verify_chain(path, key, head_path=head_path)  # NoAuditLog propagates
        if result.ok:
            raise ChainIntact(f"the chain is intact ({format_result(result, path)}): nothing to restart")
        damage = format_result(result, path)
        first: dict[str, Any] = {
            "action": "audit.chain_restart",
            "chain_reason": "the chain before this one was damaged; its files are archived as evidence",
            "damage": damage,
            "previous_records": result.records,
            "previous_last_mac": result.last_mac,
        }
        try:
            head = read_head(head_path, key)
        except HeadInvalid:
            head = None  # the damage text says so
        if head is not None:
            first["previous_head_seq"], first["previous_head_mac"] = head.seq, head.mac
        archive = _archive(path, head_path, damage, now or datetime.now(UTC))
        first["archive"] = str(archive.relative_to(path.parent))
        with AuditLog(path, key, chain_start=first) as new_log:
            written = next(iter(new_log.read_page(0, 1)), first)
    finally:
        if fd is not None:
            os.close(fd)
    log.warning("audit.chain_restarted", archive=str(archive), previous_records=result.records)
    return Restarted(archive, damage, written)


def _archive(path: Path, head_path: Path, damage: str, now: datetime) -> Path:
    """Move the log and its head (whichever exist) into a new archive directory; never overwrite one."""
    root = ensure_private_dir(path.parent / "archive")
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    for attempt in range(1000):
        target = root / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            target.mkdir(mode=0o700)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"{root}: no free archive name for {stamp}")
    for source in (path, head_path):
        if source.exists():
            os.rename(source, target / source.name)
    write_private_file(target / "verdict.txt", (damage + "\n").encode())
    fsync_dir(target)
    fsync_dir(path.parent)
    return target
