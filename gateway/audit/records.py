"""What an audit record may hold: an allow-list of content-free fields, and the filter that enforces it.

Content never enters the log: a record is filtered through the allow-list of keys and scalar types below,
so anything else (a prompt, a file body, a token) is dropped before it reaches the file, and the drop is
logged by name.  Kept apart from the writer (log.py) so the list is easy to find and review on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import structlog

__all__ = ["MAX_TEXT_CHARS", "OUTCOMES", "RECORD_FIELDS", "now_rfc3339", "sanitize_record"]

log = structlog.get_logger(__name__)

# The only keys a record may hold, with their types.  Never add one that can carry content.
RECORD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "time": str,
    "request_id": str,
    "subject": str,
    "tenant": str,
    "client": str,
    "method": str,
    "route": str,
    "action": str,
    "resource_id": str,
    "status": int,
    "outcome": str,
    "duration_ms": (int, float),
    "prompt_tokens": int,
    "completion_tokens": int,
    # A chain's first record only (log.py, restart.py): why it began and, after damage, what came before.
    "chain_reason": str,
    "previous_head_seq": int,
    "previous_head_mac": str,
    "previous_records": int,
    "previous_last_mac": str,
    "damage": str,
    "archive": str,
    "count": int,  # summary records: how many requests they stand for
    "since": str,  # summary records: when the period they cover began
}
OUTCOMES = frozenset({"allowed", "denied", "error"})
MAX_TEXT_CHARS = 256


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sanitize_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Keep allow-listed keys with scalar values of the right type; drop (and name) everything else."""
    clean: dict[str, Any] = {}
    dropped: list[str] = []
    for name, value in record.items():
        kind = RECORD_FIELDS.get(name)
        if kind is None or isinstance(value, bool) or not (value is None or isinstance(value, kind)):
            dropped.append(str(name)[:40])
            continue
        if name == "outcome" and value not in OUTCOMES:
            dropped.append(name)
            continue
        if isinstance(value, str):
            value = value[:MAX_TEXT_CHARS]
        elif isinstance(value, float):
            value = round(value, 3) if value == value and abs(value) != float("inf") else None
        clean[name] = value
    if dropped:
        log.warning("audit.fields_dropped", fields=sorted(dropped))
    clean.setdefault("time", now_rfc3339())
    return clean
