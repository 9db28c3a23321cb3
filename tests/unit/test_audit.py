"""The audit chain: every kind of edit is found and named by line; restarts continue the chain."""

from __future__ import annotations

import itertools
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from gateway.audit.log import AuditChainBroken, AuditLog, AuditLogBusy, open_audit_log
from gateway.audit.verify import NoAuditLog, format_result, verify_chain
from gateway.auth.keys import ensure_dev_keys
from gateway.core.settings import Settings

KEY = b"k" * 32


def _record(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "request_id": f"req{n:04d}",
        "subject": "alice",
        "tenant": "acme" if n % 2 else "globex",
        "client": "127.0.0.1",
        "method": "POST",
        "route": "/v1/chat/completions",
        "action": "chat.create",
        "status": 200,
        "outcome": "allowed",
        "duration_ms": 12.5,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        **extra,
    }


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    """Six records: the chain's first (audit.chain_start), then requests numbered as their seq, 2 to 6."""
    path = tmp_path / "audit" / "audit.jsonl"
    with AuditLog(path, KEY) as log:
        for n in range(2, 7):
            log.append(_record(n))
    return path


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def test_intact_log_verifies(log_path: Path) -> None:
    result = verify_chain(log_path, KEY)
    assert (result.ok, result.records, result.first_bad_line) == (True, 6, None)
    assert format_result(result, log_path).startswith("OK ")
    records = [json.loads(line) for line in _lines(log_path)]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0]["prev"] == "0" * 64
    assert all(b["prev"] == a["mac"] for a, b in itertools.pairwise(records))
    assert records[0]["time"].endswith("Z")


def test_files_are_private(log_path: Path) -> None:
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(log_path.with_name("audit.jsonl.head").stat().st_mode) == 0o600
    assert stat.S_IMODE(log_path.parent.stat().st_mode) == 0o700


def test_changed_field_is_named(log_path: Path) -> None:
    lines = _lines(log_path)
    lines[2] = lines[2].replace(b'"status":200', b'"status":403')
    _write_lines(log_path, lines)
    result = verify_chain(log_path, KEY)
    assert (result.ok, result.first_bad_line, result.records) == (False, 3, 2)
    assert "altered" in result.reason
    assert format_result(result).startswith("TAMPERED")


def test_recomputed_sha_without_key_does_not_help(log_path: Path) -> None:
    lines = _lines(log_path)
    record = json.loads(lines[3])
    record["subject"] = "mallory"
    lines[3] = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    _write_lines(log_path, lines)
    assert verify_chain(log_path, KEY).first_bad_line == 4


def test_deleted_line_is_named(log_path: Path) -> None:
    lines = _lines(log_path)
    del lines[2]
    _write_lines(log_path, lines)
    result = verify_chain(log_path, KEY)
    assert (result.ok, result.first_bad_line) == (False, 3)
    assert "removed" in result.reason


def test_first_line_deleted_is_named(log_path: Path) -> None:
    _write_lines(log_path, _lines(log_path)[1:])
    assert verify_chain(log_path, KEY).first_bad_line == 1


def test_reordered_lines_are_named(log_path: Path) -> None:
    lines = _lines(log_path)
    lines[3], lines[4] = lines[4], lines[3]
    _write_lines(log_path, lines)
    result = verify_chain(log_path, KEY)
    assert (result.ok, result.first_bad_line) == (False, 4)


def test_duplicated_line_is_named(log_path: Path) -> None:
    lines = _lines(log_path)
    lines.insert(3, lines[2])
    _write_lines(log_path, lines)
    result = verify_chain(log_path, KEY)
    assert (result.ok, result.first_bad_line) == (False, 4)
    assert "repeated" in result.reason


@pytest.mark.parametrize("keep", [0, 1, 3, 5])
def test_truncated_tail_is_named(log_path: Path, keep: int) -> None:
    _write_lines(log_path, _lines(log_path)[:keep])
    result = verify_chain(log_path, KEY)
    assert (result.ok, result.first_bad_line, result.records) == (False, keep + 1, keep)
    assert "cut off" in result.reason
    with pytest.raises(AuditChainBroken, match="cut off"):
        AuditLog(log_path, KEY)  # the gateway refuses to extend it


def test_log_cut_mid_line_is_named(log_path: Path) -> None:
    data = log_path.read_bytes()
    log_path.write_bytes(data[: len(data) - 40])  # the last line loses its end, newline included
    result = verify_chain(log_path, KEY)
    assert (result.ok, result.first_bad_line) == (False, 6)


def test_deleted_or_forged_head_is_caught(log_path: Path) -> None:
    head = log_path.with_name("audit.jsonl.head")
    body = json.loads(head.read_text())
    head.write_text(json.dumps({**body, "seq": 3}))  # point the anchor at an earlier record
    assert not verify_chain(log_path, KEY).ok
    head.unlink()
    result = verify_chain(log_path, KEY)
    assert result.verdict == "incomplete" and "head file audit.jsonl.head is missing" in result.reason
    assert format_result(result, log_path).startswith("INCOMPLETE ")  # not the word for real tampering


def test_a_copy_verifies_with_its_head_named_elsewhere(log_path: Path, tmp_path: Path) -> None:
    copy = tmp_path / "evidence" / "copy.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(log_path.read_bytes())
    assert verify_chain(copy, KEY).verdict == "incomplete"
    assert verify_chain(copy, KEY, head_path=log_path.with_name("audit.jsonl.head")).ok


def test_a_path_with_no_log_is_not_a_verdict(tmp_path: Path) -> None:
    with pytest.raises(NoAuditLog, match="no audit log at"):
        verify_chain(tmp_path / "typo.jsonl", KEY)


def test_a_log_deleted_beside_its_head_is_tampering(log_path: Path) -> None:
    log_path.unlink()
    result = verify_chain(log_path, KEY)
    assert result.verdict == "tampered" and "cut off" in result.reason


def test_the_cli_exit_status_names_the_verdict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli.main import main

    settings = Settings(data_dir=str(tmp_path / "data"))
    ensure_dev_keys(settings)
    env = {"GATEWAY_DATA_DIR": settings.data_dir}
    log = open_audit_log(settings)
    for n in range(1, 4):
        log.append(_record(n))
    log.close()
    path = settings.data_path / settings.audit.path
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        assert main(["audit", "verify"]) == 0
        assert main(["audit", "verify", "--log", str(tmp_path / "nonexistent.jsonl")]) == 2
        assert "no audit log at" in capsys.readouterr().err
        head = Path(f"{path}.head")
        saved = head.read_bytes()
        head.unlink()
        assert main(["audit", "verify"]) == 3
        head.write_bytes(saved)
        _write_lines(path, _lines(path)[:-1])
        assert main(["audit", "verify"]) == 1
        assert capsys.readouterr().out.splitlines()[-1].startswith("TAMPERED ")


def test_whole_log_replaced_by_another_chain_is_caught(log_path: Path, tmp_path: Path) -> None:
    other = tmp_path / "other" / "audit.jsonl"
    with AuditLog(other, KEY) as log:
        for n in range(1, 7):
            log.append(_record(n, status=500))
    log_path.write_bytes(other.read_bytes())
    result = verify_chain(log_path, KEY)
    assert not result.ok and result.first_bad_line == 6


def test_wrong_key_fails_at_line_one(log_path: Path) -> None:
    result = verify_chain(log_path, b"x" * 32)
    assert not result.ok
    assert result.first_bad_line is None or result.first_bad_line == 1  # the head's own MAC fails first


def test_restart_continues_the_chain(log_path: Path) -> None:
    with AuditLog(log_path, KEY) as log:
        assert log.last_seq == 6
        written = log.append(_record(7))
    assert written["seq"] == 7
    assert written["prev"] == json.loads(_lines(log_path)[5])["mac"]
    with AuditLog(log_path, KEY) as log:
        log.append(_record(8))
    result = verify_chain(log_path, KEY)
    assert (result.ok, result.records) == (True, 8)


def test_torn_last_line_from_a_crash_is_repaired(log_path: Path) -> None:
    with open(log_path, "ab") as fh:
        fh.write(b'{"seq":7,"prev":"abc","status":2')  # the write a crash interrupted
    result = verify_chain(log_path, KEY)
    assert result.ok and "incomplete last line" in result.reason
    with AuditLog(log_path, KEY) as log:
        assert log.append(_record(7))["seq"] == 7
    result = verify_chain(log_path, KEY)
    assert (result.ok, result.records) == (True, 7)


def test_crash_between_log_and_head_write_is_accepted(log_path: Path) -> None:
    head = log_path.with_name("audit.jsonl.head")
    old_head = head.read_bytes()
    with AuditLog(log_path, KEY) as log:
        log.append(_record(7))
    head.write_bytes(old_head)  # as if the process died before replacing the head
    assert verify_chain(log_path, KEY).ok
    with AuditLog(log_path, KEY) as log:
        log.append(_record(8))
    assert verify_chain(log_path, KEY).records == 8


def test_a_corrupt_last_line_refuses_to_open(log_path: Path) -> None:
    lines = _lines(log_path)
    lines[-1] = lines[-1].replace(b'"status":200', b'"status":201')
    _write_lines(log_path, lines)
    with pytest.raises(AuditChainBroken, match="line 6"):
        AuditLog(log_path, KEY)


def test_forbidden_keys_are_never_written(tmp_path: Path) -> None:
    path = tmp_path / "a" / "audit.jsonl"
    secret_bits = {
        "messages": [{"role": "user", "content": "my diagnosis is SECRET-PROMPT"}],
        "content": "SECRET-FILE-BODY",
        "authorization": "Bearer SECRET-TOKEN",
        "token": "SECRET-TOKEN",
        "prompt": "SECRET-PROMPT",
    }
    with AuditLog(path, KEY) as log:
        written = log.append(_record(1, **secret_bits))
        # An allowed key with a non-scalar value could smuggle content too.
        log.append(_record(2, resource_id={"content": "SECRET-NESTED"}, status="SECRET-STATUS"))
        log.append(_record(3, outcome="SECRET-OUTCOME", duration_ms=True))
    data = path.read_text()
    assert "SECRET" not in data
    assert set(written) <= {*_record(1), "time", "seq", "prev", "mac"}
    assert verify_chain(path, KEY).ok


def test_long_values_are_capped(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "audit.jsonl", KEY) as log:
        written = log.append(_record(1, route="/v1/" + "x" * 10_000))
    assert len(written["route"]) == 256


def test_read_page_filters_and_pages(log_path: Path) -> None:
    with AuditLog(log_path, KEY) as log:
        first = log.read_page(after_seq=0, limit=2)
        assert [r["seq"] for r in first] == [1, 2]
        assert [r["seq"] for r in log.read_page(after_seq=2, limit=100)] == [3, 4, 5, 6]
        assert [r["seq"] for r in log.read_page(after_seq=0, limit=10, tenant="acme")] == [3, 5]
        assert log.read_page(after_seq=6) == []


def test_concurrent_appends_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, KEY) as log:
        threads = [
            threading.Thread(target=lambda: [log.append(_record(n)) for n in range(25)]) for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    result = verify_chain(path, KEY)
    assert (result.ok, result.records) == (True, 101)  # the chain's first record and the 100


def test_failed_write_leaves_no_torn_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, KEY) as log:
        log.append(_record(1))
        real_write = os.write

        def half_then_fail(fd: int, data: Any) -> int:
            real_write(fd, bytes(data)[:20])
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "write", half_then_fail)
        with pytest.raises(OSError):
            log.append(_record(2))
        monkeypatch.setattr(os, "write", real_write)
        log.append(_record(3))
    result = verify_chain(path, KEY)
    assert (result.ok, result.records) == (True, 3)  # the chain's first record, 1 and 3


def test_open_from_settings(tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"))
    ensure_dev_keys(settings)
    with open_audit_log(settings) as log:
        log.append(_record(1))
        assert log.path == tmp_path / "data" / "audit" / "audit.jsonl"
    key = (tmp_path / "data" / "keys" / "audit.key").read_bytes()
    assert verify_chain(tmp_path / "data" / "audit" / "audit.jsonl", key).ok


def test_short_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        AuditLog(tmp_path / "audit.jsonl", b"short")


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, KEY), pytest.raises(AuditLogBusy):
        AuditLog(path, KEY)
    with AuditLog(path, KEY) as log:  # free again once the first is closed
        log.append(_record(1))
