"""Training data: validate an upload, read it as conversations, tokenize with the chat template, pack.

Two input formats (chat and alpaca, see finetune.formats), detected per record, one per file, as JSONL or
as one JSON array.

Both become a `Conversation`: a list of `Turn(role, text, trainable)`.  `tokenize` (finetune.chat_template,
re-exported here) labels tokens for the loss only on trainable assistant turns.  `pack` lays
several examples end to end in one row with positions restarting for each: no compute is spent on padding,
none on a prompt prefix the examples share (it is laid down once), and the trainer's attention keeps every
example to itself.

Errors never quote the data: a message names the line, the field and the problem, since callers may log it.
This module does not import torch, so the gateway can validate uploads without it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.chat_template import IGNORE_INDEX, Example, tokenize
from finetune.formats import Conversation, Format, InvalidRecord, Turn, parse_record

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "Conversation",
    "DataError",
    "DataStats",
    "Example",
    "Turn",
    "load_conversations",
    "pack",
    "tokenize",
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


# --- packing ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """Examples laid end to end in one row: no padding, positions restarting for each example.

    Two cuts save compute without changing the loss or its gradients.  Each example stops at the input that
    predicts its last learned token: later tokens cannot reach the loss through causal attention.  And when
    the examples open with the same prompt tokens (a system prompt, an Alpaca instruction), that prefix is
    laid down once as segment 0 (`shared_prefix` tokens) and every example continues from it; the trainer's
    attention lets each example see the prefix and itself, and nothing else.
    """

    input_ids: list[int]
    targets: list[int]  # the token each position must predict (the next one), or IGNORE_INDEX
    position_ids: list[int]
    boundaries: list[int]  # segment k spans [boundaries[k], boundaries[k + 1])
    shared_prefix: int  # length of segment 0 when it is a prefix the other segments share, else 0
    example_tokens: int  # the examples' own lengths summed: the tokens this batch trains on

    @property
    def examples(self) -> int:
        return len(self.boundaries) - 1 - (self.shared_prefix > 0)

    @property
    def tokens(self) -> int:
        """Tokens the model computes on: example_tokens less the shared prefix repeats and cut tails."""
        return len(self.input_ids)

    @property
    def trainable_tokens(self) -> int:
        return sum(target != IGNORE_INDEX for target in self.targets)


def pack(
    examples: Sequence[Example],
    max_tokens_per_batch: int,
    seed: int,
    *,
    max_examples_per_batch: int | None = None,
    share_prefix: bool = True,
) -> list[Batch]:
    """Shuffle with `seed`, then fill batches in that order up to the token and example limits.

    Examples without a learned token (tokenize never returns any) are skipped: they add nothing to the loss.
    """
    examples = [example for example in examples if example.trainable_tokens]
    longest = max((len(example.input_ids) for example in examples), default=0)
    if longest > max_tokens_per_batch:
        raise ValueError(
            f"max_tokens_per_batch={max_tokens_per_batch} is below the longest example ({longest})"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)  # noqa: S311 - a reproducible data order, not a secret
    groups: list[list[Example]] = []
    tokens = 0
    for index in order:
        example = examples[index]
        full = groups and max_examples_per_batch is not None and len(groups[-1]) >= max_examples_per_batch
        if not groups or full or tokens + len(example.input_ids) > max_tokens_per_batch:
            groups.append([])
            tokens = 0
        groups[-1].append(example)
        tokens += len(example.input_ids)
    return [_concatenate(group, share_prefix=share_prefix) for group in groups]


def _concatenate(group: list[Example], *, share_prefix: bool) -> Batch:
    learned = [[t for t, label in enumerate(e.labels) if t and label != IGNORE_INDEX] for e in group]
    # Position t predicts label t + 1: the prefix may run up to just before the first learned label.
    prefix = _common_prefix([e.input_ids for e in group]) if share_prefix and len(group) > 1 else 0
    prefix = min([prefix, *(positions[0] - 1 for positions in learned)])
    input_ids, targets = group[0].input_ids[:prefix], [IGNORE_INDEX] * prefix
    position_ids, boundaries = list(range(prefix)), [0, prefix] if prefix else [0]
    for example, positions in zip(group, learned, strict=True):
        end = positions[-1]  # the input at end - 1 predicts the last learned token; later ones feed nothing
        input_ids += example.input_ids[prefix:end]
        targets += example.labels[prefix + 1 : end + 1]
        position_ids += range(prefix, end)
        boundaries.append(len(input_ids))
    example_tokens = sum(len(example.input_ids) for example in group)
    return Batch(input_ids, targets, position_ids, boundaries, prefix, example_tokens)


def _common_prefix(sequences: list[list[int]]) -> int:
    length = 0
    for column in zip(*sequences, strict=False):
        if any(token != column[0] for token in column):
            break
        length += 1
    return length
