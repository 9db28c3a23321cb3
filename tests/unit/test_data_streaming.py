"""Upload validation is linear and streaming: time grows with the file, not with size x records; a record
larger than the cap is refused; records cut by a read chunk (or a UTF-8 sequence cut in two) read whole."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from contracts import training_data
from contracts.training_data import DataError, load_conversations, validate_file

ALPACA = {"instruction": "Say hi", "output": "hi"}


def _array_file(path: Path, records: int, padding: int) -> Path:
    """A JSON array of `records` tiny records after `padding` bytes of one big (valid) record."""
    big = {"instruction": "x" * padding, "output": "y"}
    path.write_text(json.dumps([big] + [ALPACA] * records, indent=1))
    return path


def _cpu_seconds(path: Path, max_record_bytes: int) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        validate_file(path, max_rows=10**7, max_record_bytes=max_record_bytes)
        best = min(best, time.process_time() - started)
    return best


@pytest.mark.parametrize("kind", ["array", "jsonl"])
def test_validation_time_grows_linearly(tmp_path: Path, kind: str) -> None:
    """4x the records (and the bytes before them) -> well under 6x the time (a rescan per record was ~16x)."""
    sizes = []
    for scale in (1, 4):
        path = tmp_path / f"{kind}-{scale}.json"
        if kind == "array":
            _array_file(path, 2_000 * scale, 500_000 * scale)
        else:
            rows = [{"instruction": "x" * 500_000 * scale, "output": "y"}] + [ALPACA] * (2_000 * scale)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        sizes.append(_cpu_seconds(path, max_record_bytes=4 << 20))
    assert sizes[1] < 6 * sizes[0], f"1x {sizes[0] * 1000:.1f} ms, 4x {sizes[1] * 1000:.1f} ms"


def test_a_record_over_the_cap_is_refused(tmp_path: Path) -> None:
    for path in (_array_file(tmp_path / "a.json", 3, 5_000), tmp_path / "b.jsonl"):
        if path.suffix == ".jsonl":
            path.write_text(
                json.dumps(ALPACA) + "\n" + json.dumps({"instruction": "x" * 5_000, "output": "y"})
            )
        with pytest.raises(DataError, match="longer than 4096 bytes") as caught:
            validate_file(path, max_rows=10, max_record_bytes=4096)
        assert caught.value.line in (1, 2)
        assert validate_file(path, max_rows=10, max_record_bytes=8192).rows in (2, 4)


def test_records_cut_by_the_read_chunk_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training_data, "_CHUNK", 7)  # every record and many UTF-8 sequences cut in two
    records = [{"instruction": f"ça va {i} — 日本語 🙂", "output": str(i)} for i in range(40)]
    records.append({"instruction": "last", "output": "n", "score": 12345678901234567890})
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    assert validate_file(path, max_rows=100).rows == 41
    conversations = load_conversations(path)
    assert [c[0].text for c in conversations[:2]] == [
        records[0]["instruction"],
        records[1]["instruction"],
    ]
    one_line = tmp_path / "b.json"  # no newline anywhere, then a number that ends at a chunk's end
    one_line.write_text(json.dumps([ALPACA] * 30, separators=(",", ":")), encoding="utf-8")
    assert validate_file(one_line, max_rows=100).rows == 30


def test_an_error_deep_in_a_streamed_array_names_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(training_data, "_CHUNK", 64)
    records = [ALPACA] * 50 + [{"instruction": "no output"}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records, indent=2))
    with pytest.raises(DataError) as caught:
        validate_file(path, max_rows=100)
    assert caught.value.record == 51
    assert path.read_text().splitlines()[caught.value.line - 1].strip() == "{"
    broken = tmp_path / "b.json"
    broken.write_text("[\n" + ",\n".join([json.dumps(ALPACA)] * 20) + ',\n{"instruction": ]\n')
    with pytest.raises(DataError, match="not valid JSON") as caught:
        validate_file(broken, max_rows=100)
    assert caught.value.line == 22 and caught.value.record == 21
    cut_utf8 = tmp_path / "c.json"
    cut_utf8.write_bytes(b'[{"instruction": "a", "output": "\xc3"}]')
    with pytest.raises(DataError, match="UTF-8"):
        validate_file(cut_utf8, max_rows=10)
