"""The audit chain's two ends: a log is born with a signed genesis head and a first record saying so; a
damaged log stops the gateway until `gateway audit restart-chain` archives it and starts a chain naming the
damage."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.audit.chain import GENESIS, Head, head_path_for, read_head, write_head
from gateway.audit.log import AuditChainBroken, AuditLog, AuditLogBusy
from gateway.audit.restart import ChainIntact, restart_chain
from gateway.audit.verify import NoAuditLog, verify_chain
from gateway.auth.keys import ensure_dev_keys
from gateway.cli.main import main
from gateway.core.settings import Settings

KEY = b"r" * 32


def _request(n: int) -> dict[str, Any]:
    return {"request_id": f"req{n}", "method": "GET", "route": "/v1/models", "status": 200}


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _lines(path)]


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "audit" / "audit.jsonl"
    with AuditLog(path, KEY) as log:
        for n in range(2, 9):
            log.append(_request(n))
    return path


def test_a_new_log_starts_with_a_genesis_head_and_a_first_record_that_says_so(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    with capture_logs() as logs, AuditLog(path, KEY) as log:
        assert log.last_seq == 1
    [first] = _records(path)
    assert (first["seq"], first["prev"], first["action"]) == (1, GENESIS, "audit.chain_start")
    assert "no audit log or head file was found" in first["chain_reason"]
    assert next(e for e in logs if e["event"] == "audit.chain_started")["log_level"] == "warning"
    head = read_head(head_path_for(path), KEY)
    assert head is not None and (head.seq, head.mac) == (1, first["mac"])
    result = verify_chain(path, KEY)
    assert result.ok and "it began" in result.reason and "audit.chain_start" in result.reason


def test_a_crash_after_the_genesis_head_leaves_a_chain_that_opens(tmp_path: Path) -> None:
    """Genesis head written, the first record torn by a crash: an empty chain, opened with its record."""
    path = tmp_path / "audit.jsonl"
    write_head(head_path_for(path), KEY, Head(0, GENESIS))
    path.write_bytes(b'{"seq":1,"prev":"00')
    result = verify_chain(path, KEY)
    assert result.ok and result.records == 0 and "incomplete last line" in result.reason
    with AuditLog(path, KEY) as log:
        assert log.last_seq == 1
    assert [r["action"] for r in _records(path)] == ["audit.chain_start"]
    assert verify_chain(path, KEY).ok


def test_a_forged_genesis_head_is_tampering(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_head(head_path_for(path), b"x" * 32, Head(0, GENESIS))  # signed with another key
    path.write_bytes(b"")
    assert verify_chain(path, KEY).verdict == "tampered"
    with pytest.raises(AuditChainBroken, match="altered"):
        AuditLog(path, KEY)


def test_a_log_cut_to_one_record_without_its_head_is_not_ok(log_path: Path) -> None:
    log_path.write_bytes(_lines(log_path)[0])
    head_path_for(log_path).unlink()
    result = verify_chain(log_path, KEY)
    assert result.verdict == "incomplete" and "head file audit.jsonl.head is missing" in result.reason
    with pytest.raises(AuditChainBroken, match="restart-chain"):
        AuditLog(log_path, KEY)


def test_a_log_without_its_head_refuses_to_open(log_path: Path) -> None:
    head_path_for(log_path).unlink()
    with pytest.raises(AuditChainBroken, match="is missing"):
        AuditLog(log_path, KEY)


def test_deleting_both_files_starts_a_new_chain_loudly(log_path: Path) -> None:
    log_path.unlink()
    head_path_for(log_path).unlink()
    with capture_logs() as logs, AuditLog(log_path, KEY) as log:
        log.append(_request(2))
    assert [r.get("action") for r in _records(log_path)] == ["audit.chain_start", None]
    assert any(e["event"] == "audit.chain_started" for e in logs)


def test_a_log_ahead_of_its_genesis_head_lost_nothing(tmp_path: Path) -> None:
    """The head write after the first batch failed (or the process died before it): the log is longer."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, KEY) as log:
        log.append(_request(2))
    write_head(head_path_for(path), KEY, Head(0, GENESIS))
    assert verify_chain(path, KEY).ok
    with AuditLog(path, KEY) as log:
        assert log.append(_request(3))["seq"] == 3


def test_restart_chain_archives_the_damage_and_starts_a_chain_naming_it(log_path: Path) -> None:
    original_log, original_head = log_path.read_bytes(), head_path_for(log_path).read_bytes()
    old_head = read_head(head_path_for(log_path), KEY)
    assert old_head is not None
    lines = _lines(log_path)
    log_path.write_bytes(b"".join(lines[:5]))  # the last three records cut off
    cut = log_path.read_bytes()
    with pytest.raises(AuditChainBroken, match="cut off the end"):
        AuditLog(log_path, KEY)

    done = restart_chain(log_path, KEY, now=datetime(2026, 12, 1, 9, 30, tzinfo=UTC))
    assert done.archive == log_path.parent / "archive" / "20261201T093000Z"
    assert (done.archive / "audit.jsonl").read_bytes() == cut  # moved as it was: evidence
    assert (done.archive / "audit.jsonl.head").read_bytes() == original_head
    assert "TAMPERED" in (done.archive / "verdict.txt").read_text()
    assert original_log.startswith(cut)

    [first] = _records(log_path)
    assert first["action"] == "audit.chain_restart" and first["seq"] == 1 and first["prev"] == GENESIS
    assert (first["previous_head_seq"], first["previous_head_mac"]) == (old_head.seq, old_head.mac)
    assert first["previous_records"] == 5 and first["previous_last_mac"] == json.loads(lines[4])["mac"]
    assert "cut off" in first["damage"] and first["archive"] == "archive/20261201T093000Z"
    assert first == done.first_record
    result = verify_chain(log_path, KEY)
    assert result.ok and "audit.chain_restart after damage" in result.reason
    with AuditLog(log_path, KEY) as log:  # the gateway can start again
        assert log.append(_request(2))["seq"] == 2

    # a second restart in the same second never overwrites the first archive
    head_path_for(log_path).unlink()
    again = restart_chain(log_path, KEY, now=datetime(2026, 12, 1, 9, 30, tzinfo=UTC))
    assert again.archive.name == "20261201T093000Z-1" and "previous_head_seq" not in again.first_record
    assert "INCOMPLETE" in again.damage and (done.archive / "audit.jsonl").read_bytes() == cut


def test_restart_chain_refuses_an_intact_chain_a_running_gateway_and_nothing(log_path: Path) -> None:
    with pytest.raises(ChainIntact, match="nothing to restart"):
        restart_chain(log_path, KEY)
    busy = log_path.parent / "busy.jsonl"
    with AuditLog(busy, KEY) as running:
        running.append(_request(2))
        head_path_for(busy).unlink()  # damage while a gateway holds it
        with pytest.raises(AuditLogBusy, match="stop the service"):
            restart_chain(busy, KEY)
    with pytest.raises(NoAuditLog):
        restart_chain(log_path.parent / "never.jsonl", KEY)
    assert not (log_path.parent / "archive").exists()  # nothing was moved by a refusal


def test_a_log_deleted_beside_its_head_can_be_restarted(log_path: Path) -> None:
    log_path.unlink()
    done = restart_chain(log_path, KEY)
    assert not (done.archive / "audit.jsonl").exists() and (done.archive / "audit.jsonl.head").exists()
    assert "cut off" in done.damage and verify_chain(log_path, KEY).ok


def test_the_cli_restarts_a_damaged_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"))
    ensure_dev_keys(settings)
    key = (settings.data_path / "keys" / "audit.key").read_bytes()
    path = settings.data_path / settings.audit.path
    with AuditLog(path, key) as log:
        for n in range(2, 6):
            log.append(_request(n))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GATEWAY_DATA_DIR", settings.data_dir)
        assert main(["audit", "restart-chain"]) == 1  # intact: refused
        assert "nothing to restart" in capsys.readouterr().err
        path.write_bytes(b"".join(_lines(path)[:2]))
        assert main(["audit", "verify"]) == 1
        capsys.readouterr()
        assert main(["audit", "restart-chain"]) == 0
        out = capsys.readouterr().out
        assert "archived as evidence" in out and "the old head (seq 5" in out and "can start again" in out
        assert main(["audit", "verify"]) == 0
        assert "audit.chain_restart after damage" in capsys.readouterr().out
        # the verdicts at the edges: an empty log with no head is "nothing recorded" (2), as no log is
        empty = tmp_path / "empty.jsonl"
        empty.write_bytes(b"")
        assert main(["audit", "verify", "--log", str(empty)]) == 2
        assert "an empty audit log" in capsys.readouterr().err
