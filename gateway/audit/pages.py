"""Reading the audit log a page at a time (GET /v1/audit): seek by seq, filter by tenant, never lock.

Kept apart from the writer (log.py): reading needs no lock and no key, only that line N holds seq N, so a
page seeks by bisection and costs O(log size + page).  Safe while the writer appends: an incomplete last
line is an append in progress and ends the page.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["MAX_PAGE", "AuditPage", "read_audit_page"]

MAX_PAGE = 1000


@dataclass(frozen=True)
class AuditPage:
    records: list[dict[str, Any]]
    has_more: bool
    last_seq: int  # of the last record in `records`; the `after_seq` asked for when it is empty


def read_audit_page(path: Path, after_seq: int = 0, limit: int = 100, tenant: str | None = None) -> AuditPage:
    """Records with seq > after_seq (optionally one tenant's), oldest first, at most `limit` (<= 1000), and
    whether more (matching) records follow.  Blocking file I/O.

    Seeks to `after_seq` by bisecting the file (line N holds seq N, so seq order is file order), then
    reads forward: a page costs O(log size + page) unless a tenant filter has to skip other tenants.
    """
    limit = max(1, min(limit, MAX_PAGE))
    records: list[dict[str, Any]] = []
    has_more = False
    with open(path, "rb") as fh:
        fh.seek(_first_line_after(fh, os.fstat(fh.fileno()).st_size, after_seq))
        for raw in fh:
            if not raw.endswith(b"\n"):
                break  # an append in progress
            record = json.loads(raw)
            if record.get("seq", 0) <= after_seq or (tenant is not None and record.get("tenant") != tenant):
                continue
            if len(records) >= limit:
                has_more = True
                break
            records.append(record)
    return AuditPage(records, has_more, records[-1]["seq"] if records else after_seq)


def _line_seq(raw: bytes) -> int | None:
    try:
        seq = json.loads(raw).get("seq") if raw.endswith(b"\n") else None
    except (ValueError, AttributeError):
        return None
    return seq if isinstance(seq, int) else None


def _first_line_after(fh: BinaryIO, size: int, after_seq: int) -> int:
    """An offset at or before the first line whose seq > after_seq, found by bisection.

    Invariants: `lo` is a line start and every line before it has seq <= after_seq; every line starting
    at or after `hi` has seq > after_seq.  Anything unexpected stops the search early; the caller reads
    forward from `lo` and skips, so the answer is only ever less sharp, never wrong.
    """
    lo, hi = 0, size
    while hi - lo > 8192:
        mid = (lo + hi) // 2
        fh.seek(mid - 1)
        fh.readline()  # to the first line start at or after mid
        start = fh.tell()
        if start >= hi:
            break
        raw = fh.readline()
        seq = _line_seq(raw)
        if seq is None:
            break
        if seq <= after_seq:
            lo = start + len(raw)
        else:
            hi = start
    return lo
