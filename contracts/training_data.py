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
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.training_formats import Conversation, Format, InvalidRecord, Turn, parse_record

__all__ = [
    "DEFAULT_MAX_RECORD_BYTES",
    "Conversation",
    "DataError",
    "DataStats",
    "Turn",
    "load_conversations",
    "validate_file",
]


DEFAULT_MAX_RECORD_BYTES = 1 << 20
_CHUNK = 1 << 16
_SPACE = re.compile(r"[ \t\r\n]*")


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


def validate_file(
    path: Path, *, max_rows: int, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> DataStats:
    """Check a whole file, streaming it (linear in its size); raise DataError at the first bad record."""
    file_format: Format | None = None
    rows = 0
    for line, record, fmt, _ in _parse_file(path, max_record_bytes):
        file_format = file_format or fmt
        rows += 1
        if rows > max_rows:
            raise DataError(
                line, f"more than {max_rows} rows; split the file or raise the limit", record=record
            )
    assert file_format is not None  # _parse_file raises on a file without records
    return DataStats(format=file_format, rows=rows)


def load_conversations(path: Path, max_record_bytes: int = 1 << 30) -> list[Conversation]:
    """Every record of a (valid) training file as a conversation (its records' size was checked on upload,
    against the gateway's setting)."""
    return [conversation for *_, conversation in _parse_file(path, max_record_bytes)]


# --- reading ------------------------------------------------------------------------------------------------


def _parse_file(path: Path, max_record_bytes: int) -> Iterator[tuple[int, int | None, Format, Conversation]]:
    """(line, record, format, conversation) per record; raises DataError at the first problem."""
    first: tuple[Format, int] | None = None
    for line, record, obj in _read_records(path, max_record_bytes):
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


def _read_records(path: Path, max_record_bytes: int) -> Iterator[tuple[int, int | None, Any]]:
    """(line, array index + 1 or None, decoded JSON) per record, both JSONL and a JSON array streamed: the
    work is linear in the file's size and the memory bounded by one record (at most `max_record_bytes`)."""
    with path.open("rb") as fh:
        start = fh.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
        fh.seek(0)
        if start.startswith(b"["):
            yield from _ArrayReader(fh, max_record_bytes).records()
            return
        line = 0
        while raw := fh.readline(max_record_bytes + 1):
            line += 1
            if len(raw) > max_record_bytes and not raw.endswith(b"\n"):
                raise DataError(
                    line, f"a record longer than {max_record_bytes} bytes; split it or shorten it"
                )
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


class _ArrayReader:
    """A JSON array read chunk by chunk.  `text[pos:]` is what is not consumed yet (at most one record plus
    a chunk: the consumed part is dropped whenever more is read), `line` the line number at `pos`; each
    character is counted for newlines once, so the work is linear in the file's size."""

    def __init__(self, fh: Any, max_record_bytes: int) -> None:
        self.fh, self.max_record_bytes = fh, max_record_bytes
        self.decoder = json.JSONDecoder()
        self.pending = b""  # the start of a UTF-8 sequence cut by a chunk boundary
        self.text, self.pos, self.line, self.eof = "", 0, 1, False

    def _more(self) -> bool:
        if self.eof:
            return False
        chunk = self.fh.read(_CHUNK)
        data = self.pending + chunk
        if not chunk:
            self.eof = True
            if self.pending:
                raise DataError(self._line_at(len(self.text)), "not UTF-8 text; save the file as UTF-8")
            return False
        cut = _complete_utf8(data)
        self.pending = data[cut:]
        try:
            piece = data[:cut].decode("utf-8")
        except UnicodeDecodeError as exc:
            line = self._line_at(len(self.text)) + data.count(b"\n", 0, exc.start)
            raise DataError(line, "not UTF-8 text; save the file as UTF-8") from None
        self.text = self.text[self.pos :] + piece
        self.pos = 0
        return True

    def _line_at(self, end: int) -> int:
        return self.line + self.text.count("\n", self.pos, end)

    def _advance(self, end: int) -> None:
        self.line = self._line_at(end)
        self.pos = end

    def _skip_space(self) -> None:
        while True:
            match = _SPACE.match(self.text, self.pos)
            self._advance(match.end() if match else self.pos)
            if self.pos < len(self.text) or not self._more():
                break
        if self.pos >= len(self.text):
            raise DataError(self.line, "not valid JSON: the array is not closed with ']'")

    def records(self) -> Iterator[tuple[int, int | None, Any]]:
        while "[" not in self.text and self._more():
            pass
        self._advance(self.text.index("[") + 1)
        record = 0
        while True:
            self._skip_space()
            if self.text.startswith("]", self.pos):
                break
            if record:
                if not self.text.startswith(",", self.pos):
                    raise DataError(self.line, f"not valid JSON: expected ',' or ']' after record {record}")
                self._advance(self.pos + 1)
                self._skip_space()
            record += 1
            obj, end = self._decode(record)
            yield self.line, record, obj
            self._advance(end)
        self._advance(self.pos + 1)
        while True:
            if self.text[self.pos :].strip():
                raise DataError(self.line, "not valid JSON: text after the closing ']'")
            self._advance(len(self.text))
            if not self._more():
                break

    def _decode(self, record: int) -> tuple[Any, int]:
        """The record at `pos`, reading more while it may be cut off by the chunk's end (up to the cap)."""
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as exc:
                if len(self.text) - self.pos <= self.max_record_bytes and self._more():
                    continue  # perhaps cut off: retry with more (each retry adds a chunk, up to the cap)
                if not self.eof:
                    raise DataError(
                        self.line,
                        f"a record longer than {self.max_record_bytes} bytes, or not valid JSON",
                        record=record,
                    ) from None
                line = self._line_at(exc.pos)
                raise DataError(
                    line, f"not valid JSON ({exc.msg} at column {exc.colno})", record=record
                ) from None
            if end < len(self.text) or not self._more():  # a number at the chunk's end may go on
                if len(self.text[self.pos : end].encode("utf-8", "surrogatepass")) > self.max_record_bytes:
                    raise DataError(
                        self.line,
                        f"a record longer than {self.max_record_bytes} bytes; split it or shorten it",
                        record=record,
                    )
                return obj, end


def _complete_utf8(data: bytes) -> int:
    """Where the last complete UTF-8 sequence of `data` ends (a chunk may cut one in two)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return len(data)
        if byte >= 0xC0:  # a lead byte: complete when the sequence it starts has all its bytes
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)
