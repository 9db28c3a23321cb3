"""`gateway audit verify`: walk the whole chain and name the first line that was altered, removed,
reordered or cut off.  Reads only; safe to run while the gateway is writing.

Three verdicts: INTACT (printed as OK), TAMPERED (a line or the head file does not verify), and INCOMPLETE:
the records present chain intact but the head file `<log>.head` is missing, so records cut off the end could
not be noticed.  Every log is created with its (genesis) head, so beside the live log that means the head was
deleted, and the gateway refuses to start on it; a copy of the log made without its head looks the same
(verify it with --head).  A path holding no record and no head (no log, or an empty file) is not a verdict:
nothing was ever recorded there, and the caller reports it (NoAuditLog).
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.audit.chain import GENESIS, HeadInvalid, head_path_for, head_problem, read_head, record_mac

__all__ = ["NoAuditLog", "Verdict", "VerifyResult", "format_result", "verify_chain"]

Verdict = Literal["intact", "tampered", "incomplete"]


class NoAuditLog(FileNotFoundError):
    """No head file and no record (no log, or an empty one) at the path given: nothing to verify."""


@dataclass(frozen=True)
class VerifyResult:
    verdict: Verdict
    records: int  # records verified before the first problem (all of them when intact)
    first_bad_line: int | None  # 1-based; None when the problem is not a line (e.g. the head file)
    reason: str
    last_mac: str = GENESIS  # of the last record verified (restart.py names it in the next chain)

    @property
    def ok(self) -> bool:
        return self.verdict == "intact"


def _line_problem(raw: bytes, line_no: int, key: bytes, count: int, last_mac: str) -> str | None:
    """Why line `line_no` does not continue a chain of `count` verified records ending in `last_mac`."""
    try:
        record = json.loads(raw)
    except ValueError:
        return f"line {line_no} is not valid JSON"
    shape = (("seq", int), ("prev", str), ("mac", str))
    if not isinstance(record, dict) or not all(isinstance(record.get(name), kind) for name, kind in shape):
        return f"line {line_no} is not an audit record"
    if not hmac.compare_digest(record["mac"], record_mac(key, record)):
        hint = " (or the key is wrong)" if line_no == 1 else ""
        return f"line {line_no} was altered: its MAC does not match{hint}"
    seq, expected = record["seq"], count + 1
    if seq > expected:
        return f"line {line_no} holds seq {seq} where seq {expected} belongs: records removed or reordered"
    if seq < expected:
        return f"line {line_no} holds seq {seq} after seq {count}: lines reordered or repeated"
    if record["prev"] != last_mac:
        return f"line {line_no} does not link to the line before it"
    return None


def verify_chain(path: Path | str, key: bytes, *, head_path: Path | None = None) -> VerifyResult:
    path = Path(path)
    head_path = head_path or head_path_for(path)
    if not head_path.exists() and (not path.exists() or path.stat().st_size == 0):
        what = "an empty audit log" if path.exists() else "no audit log"
        raise NoAuditLog(f"{what} at {path} (nor its head file {head_path.name})")
    try:
        head = read_head(head_path, key)
    except HeadInvalid as exc:
        return VerifyResult("tampered", 0, None, str(exc))
    count, last_mac, torn, began = 0, GENESIS, False, ""
    mac_at_head_seq: str | None = GENESIS if head is not None and head.seq == 0 else None
    try:
        with open(path, "rb") as lines:
            for line_no, raw in enumerate(lines, start=1):
                if not raw.endswith(b"\n"):
                    torn = True  # judged below: harmless only if the head does not count it
                    break
                problem = _line_problem(raw, line_no, key, count, last_mac)
                if problem:
                    return VerifyResult("tampered", count, line_no, problem)
                record = json.loads(raw)
                count, last_mac = count + 1, record["mac"]
                if count == 1:
                    began = _began(record)
                if head is not None and count == head.seq:
                    mac_at_head_seq = last_mac
    except FileNotFoundError:
        pass  # the log is gone but its head is here: an empty chain, which the head must agree with
    note = "; an incomplete last line left by a crash is ignored (removed on next start)" if torn else ""
    if head is None:
        return VerifyResult(
            "incomplete",
            count,
            None,
            f"{count} record(s) chain intact, but the head file {head_path.name} is missing, so records cut "
            "off the end would go unnoticed: a log is created with its head, so beside the live log it was "
            f"deleted; verify a copy together with its head file (--head){note}",
            last_mac,
        )
    head_issue = head_problem(head, count, mac_at_head_seq)
    if head_issue:
        return VerifyResult("tampered", count, head_issue[1], head_issue[0], last_mac)
    return VerifyResult("intact", count, None, f"{count} record(s), chain intact{began}{note}", last_mac)


def _began(first: dict[str, object]) -> str:
    """How a chain's first record says it began, for the verdict line ("" for a log from before that)."""
    action = first.get("action")
    if action not in ("audit.chain_start", "audit.chain_restart"):
        return ""
    archive = first.get("archive")
    after = f" after damage; the chain before it is archived in {archive}" if archive else ""
    return f"; it began {first.get('time')} ({action}{after})"


def format_result(result: VerifyResult, path: Path | str | None = None) -> str:
    where = f"{path}: " if path else ""
    if result.ok:
        return f"OK {where}{result.reason}"
    if result.verdict == "incomplete":
        return f"INCOMPLETE {where}{result.reason}"
    line = f", first bad line {result.first_bad_line}" if result.first_bad_line is not None else ""
    return f"TAMPERED {where}{result.reason} ({result.records} record(s) verified{line})"
