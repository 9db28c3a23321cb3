"""Training data files: validate an upload and read it as conversations, naming the line of any problem.

A file holds records in one of two formats (chat or alpaca, contracts.training_formats), detected per
record, one format per file, as JSONL (streamed) or as one JSON array.  Each becomes a `Conversation` of
`Turn`s.

Errors never quote the data: a message names the line, the field and the problem, since callers may log it.
This module does not import torch, so the gateway can validate uploads without it.

Both processes read it: the gateway validates uploads, the worker's trainer reads them as conversations (and
tokenizes them with finetune.chat_template).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.training_formats import Conversation, Format, InvalidRecord, Turn, parse_record

__all__ = [
    "Conversation",
    "DataError",
    "DataStats",
    "Turn",
    "load_conversations",
    "validate_file",
]


class DataError(ValueError):
    """The first problem found in a training file: where it is and what to fix, never the content."""

    def __init__(self, line: int, reason: str, *, record: int | None = None) -> None:
        self.line = line
        self.reason = reason
        self.record = record  # 1-based element of a JSON array; None for JSONL
        where = f"line {line}" if record is None else f"record {record} (line {line})"
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class DataStats:
    format: Format
    rows: int


def validate_file(path: Path, *, max_rows: int) -> DataStats:
    """Check a whole file, streaming it; raise DataError at the first bad record."""
    file_format: Format | None = None
    rows = 0
    for line, record, fmt, _ in _parse_file(path):
        file_format = file_format or fmt
        rows += 1
        if rows > max_rows:
            raise DataError(
                line, f"more than {max_rows} rows; split the file or raise the limit", record=record
            )
    assert file_format is not None  # _parse_file raises on a file without records
    return DataStats(format=file_format, rows=rows)


def load_conversations(path: Path) -> list[Conversation]:
    """Every record of a (valid) training file as a conversation."""
    return [conversation for *_, conversation in _parse_file(path)]


# --- reading ------------------------------------------------------------------------------------------------


def _parse_file(path: Path) -> Iterator[tuple[int, int | None, Format, Conversation]]:
    """(line, record, format, conversation) per record; raises DataError at the first problem."""
    first: tuple[Format, int] | None = None
    for line, record, obj in _read_records(path):
        try:
            fmt, conversation = parse_record(obj)
        except InvalidRecord as exc:
            raise DataError(line, str(exc), record=record) from None
        if first is None:
            first = (fmt, line)
        elif fmt != first[0]:
            reason = (
                f"{fmt} record in a file that starts in {first[0]} format (line {first[1]}); use one format"
            )
            raise DataError(line, reason, record=record)
        yield line, record, fmt, conversation
    if first is None:
        raise DataError(1, "the file holds no records")


def _read_records(path: Path) -> Iterator[tuple[int, int | None, Any]]:
    """(line, array index + 1 or None, decoded JSON) per record: JSONL streamed, a JSON array read whole."""
    with path.open("rb") as fh:
        start = fh.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
        fh.seek(0)
        if start.startswith(b"["):
            yield from _read_array(fh.read())
            return
        for line, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(line, "not UTF-8 text; save the file as UTF-8") from None
            text = text.removeprefix("\ufeff") if line == 1 else text
            if not text.strip():
                continue
            try:
                yield line, None, json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(line, f"not valid JSON ({exc.msg} at column {exc.colno})") from None


def _read_array(data: bytes) -> Iterator[tuple[int, int | None, Any]]:
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise DataError(
            data.count(b"\n", 0, exc.start) + 1, "not UTF-8 text; save the file as UTF-8"
        ) from None
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    record = 0
    while True:
        pos = _skip_space(text, pos)
        if text.startswith("]", pos):
            break
        if record and not text.startswith(",", pos):
            raise DataError(_line_at(text, pos), f"not valid JSON: expected ',' or ']' after record {record}")
        pos = _skip_space(text, pos + 1) if record else pos
        record += 1
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(
                exc.lineno, f"not valid JSON ({exc.msg} at column {exc.colno})", record=record
            ) from None
        yield _line_at(text, pos), record, obj
        pos = end
    if text[pos + 1 :].strip():
        raise DataError(_line_at(text, pos + 1), "not valid JSON: text after the closing ']'")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    if pos >= len(text):
        raise DataError(_line_at(text, pos), "not valid JSON: the array is not closed with ']'")
    return pos


def _line_at(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1
