"""The audit chain's primitives, shared by the writer (log.py, recovery.py) and the checker (verify.py).

A record's `mac` is HMAC-SHA256(key, canonical JSON of the record without `mac`); it covers `seq` and `prev`
(the previous record's mac; GENESIS for the first), so editing, removing or reordering lines breaks it.
The head file `<log>.head` holds the last seq and mac under its own HMAC; it anchors the end of the chain,
so cutting records off the end shows too.  A log is created with its head: the genesis head (seq 0, mac
GENESIS) is written before the first record, so a log without a head file was never left that way by a crash,
only by someone deleting the head (or copying the log without it).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.private_files import write_private_file

__all__ = [
    "GENESIS",
    "Head",
    "HeadInvalid",
    "canonical_json",
    "head_path_for",
    "head_problem",
    "read_head",
    "record_mac",
    "write_head",
]

GENESIS = "0" * 64
_HEAD_DOMAIN = b"audit-head\x00"  # keeps a head MAC from ever equalling a record MAC


class HeadInvalid(ValueError):
    """The head file is unreadable or its MAC does not verify."""


@dataclass(frozen=True)
class Head:
    seq: int
    mac: str


def canonical_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def record_mac(key: bytes, record: Mapping[str, Any]) -> str:
    body = {name: value for name, value in record.items() if name != "mac"}
    return hmac.new(key, canonical_json(body), hashlib.sha256).hexdigest()


def _head_mac(key: bytes, seq: int, mac: str) -> str:
    return hmac.new(key, _HEAD_DOMAIN + canonical_json({"seq": seq, "mac": mac}), hashlib.sha256).hexdigest()


def head_path_for(log_path: Path) -> Path:
    return log_path.with_name(log_path.name + ".head")


def write_head(path: Path, key: bytes, head: Head) -> None:
    body = {"seq": head.seq, "mac": head.mac, "head_mac": _head_mac(key, head.seq, head.mac)}
    write_private_file(path, canonical_json(body) + b"\n")


def read_head(path: Path, key: bytes) -> Head | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        body = json.loads(raw)
        seq, mac, given = body["seq"], body["mac"], body["head_mac"]
    except (ValueError, KeyError, TypeError):
        raise HeadInvalid("the head file is not readable") from None
    if not (isinstance(seq, int) and isinstance(mac, str) and isinstance(given, str)):
        raise HeadInvalid("the head file is not readable")
    if not hmac.compare_digest(_head_mac(key, seq, mac), given):
        raise HeadInvalid("the head file was altered (its MAC does not match; or the key is wrong)")
    return Head(seq, mac)


def head_problem(
    head: Head | None, last_seq: int, mac_at_head_seq: str | None
) -> tuple[str, int | None] | None:
    """What is wrong between a verified chain ending at `last_seq` and its head: (reason, first bad line).

    `mac_at_head_seq` is the mac of the log's record numbered head.seq (None if unknown).  In a valid chain
    line N holds seq N, so the first missing record is line last_seq + 1.  A log longer than its head lost
    nothing (the head is written after the log, so a reader or a crash can see the log ahead of it).
    A missing head (None) is always a problem: every log gets its genesis head before its first record.
    """
    if head is None:
        return "the head file is missing, so records cut off the end would go unnoticed", None
    if head.seq == 0:  # the genesis head: nothing was recorded yet when it was written
        return None if head.mac == GENESIS else ("the genesis head file names a record", None)
    if last_seq < head.seq:
        cut = head.seq - last_seq
        return (
            f"the log ends at seq {last_seq} but the head file records seq {head.seq}: "
            f"{cut} record(s) were cut off the end",
            last_seq + 1,
        )
    if mac_at_head_seq != head.mac:
        return f"record {head.seq} is not the one the head file names (the log was replaced)", head.seq
    return None
