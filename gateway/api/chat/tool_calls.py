"""Tool calls out of generated text, incrementally: one parser per choice, fed the text as it streams.

Two shapes of output carry calls:

  - "auto": free text with Hermes/Qwen blocks, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the
    block holding one call or a list of them (SmolLM2's own format is a list inside the tags);
  - "forced" (tool_choice required or a named function): the whole output is a grammar-constrained JSON list
    of calls, `[{"name": ..., "arguments": {...}}, ...]`.

A call whose JSON starts with its name streams as it is generated: a first event with the call's id and
name, then the arguments in pieces (never past the value's closing brace).  Any other order is emitted whole
when its block closes.  A block that does not parse is content after all ("auto").  Non-streamed responses
run the same parser over the whole text, so both paths agree.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["CallEvent", "ToolCallParser", "new_call_id"]

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class CallEvent:
    """A piece of call `index`: `id`/`name` on its first event only, then `arguments` text."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass
class _Call:
    id: str
    name: str
    sent: int = 0  # characters of the arguments already emitted


@dataclass
class ToolCallParser:
    mode: Literal["auto", "forced"]
    calls: list[_Call] = field(default_factory=list)
    _buf: str = ""  # auto, outside a block: text held back (a possible start of the tag)
    _body: str | None = None  # inside a block (forced: the whole output)
    _block_start: int = 0  # index of the block's first call in `calls`

    def __post_init__(self) -> None:
        if self.mode == "forced":
            self._body = ""

    def feed(self, text: str) -> tuple[str, list[CallEvent]]:
        """New text in -> (content to send, call events to send)."""
        content: list[str] = []
        events: list[CallEvent] = []
        if self._body is not None:
            self._body += text
        else:
            self._buf += text
        while True:
            if self._body is None:
                at = self._buf.find(OPEN)
                if at < 0:
                    keep = _partial_suffix(self._buf, OPEN)
                    content.append(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    break
                content.append(self._buf[:at])
                self._body, self._buf = self._buf[at + len(OPEN) :], ""
                self._block_start = len(self.calls)
                continue
            end = self._body.find(CLOSE) if self.mode == "auto" else -1
            if end < 0:
                events.extend(self._stream(self._body))
                break
            body, rest = self._body[:end], self._body[end + len(CLOSE) :]
            text_back, closed = self._close(body, tagged=True)
            content.append(text_back)
            events.extend(closed)
            self._body, self._buf = None, rest
        return "".join(content), events

    def finish(self) -> tuple[str, list[CallEvent]]:
        """The output ended: flush what was held back; an unclosed block is closed as it stands."""
        if self._body is None:
            content, self._buf = self._buf, ""
            return content, []
        body, self._body = self._body, None
        return self._close(body, tagged=False)

    # -- blocks ----------------------------------------------------------------------------------------

    def _stream(self, body: str) -> list[CallEvent]:
        events = []
        for offset, (name, args, _) in enumerate(_scan(body)):
            index = self._block_start + offset
            if index == len(self.calls):
                self.calls.append(_Call(new_call_id(), name))
                events.append(CallEvent(index, "", id=self.calls[index].id, name=name))
            call = self.calls[index]
            if len(args) > call.sent:
                events.append(CallEvent(index, args[call.sent :]))
                call.sent = len(args)
        return events

    def _close(self, body: str, *, tagged: bool) -> tuple[str, list[CallEvent]]:
        events = self._stream(body)
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        items = parsed if isinstance(parsed, list) else [parsed]
        calls = [_as_call(item) for item in items]
        if parsed is None or not calls or any(c is None for c in calls):
            if self.mode == "auto" and len(self.calls) == self._block_start:
                return f"{OPEN}{body}{CLOSE if tagged else ''}", events
            return "", events
        scanned = _scan(body)
        for offset, call in enumerate(calls):
            assert call is not None
            name, arguments = call
            index = self._block_start + offset
            if index < len(self.calls):  # streamed: send the rest of what was scanned
                full = scanned[offset][1] if offset < len(scanned) else arguments
                sent = self.calls[index].sent
                if len(full) > sent:
                    events.append(CallEvent(index, full[sent:]))
                    self.calls[index].sent = len(full)
                continue
            self.calls.append(_Call(new_call_id(), name, len(arguments)))
            events.append(CallEvent(index, arguments, id=self.calls[index].id, name=name))
        self._block_start = len(self.calls)
        return "", events


def _as_call(item: Any) -> tuple[str, str] | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return item["name"], json.dumps(arguments)


def _scan(body: str) -> list[tuple[str, str, bool]]:
    """The name-first calls in `body` (one object or a list of them, perhaps cut short): (name, arguments
    text so far, complete)."""
    out: list[tuple[str, str, bool]] = []
    i, n = 0, len(body)
    while i < n and body[i].isspace():
        i += 1
    if i < n and body[i] == "[":
        i += 1
    while True:
        while i < n and (body[i].isspace() or body[i] == ","):
            i += 1
        match = _HEADER.match(body, i)
        if match is None or match.end() >= n or body[match.end()] != "{":
            return out
        try:
            name = json.loads(f'"{match.group(1)}"')
        except ValueError:
            return out
        start = match.end()
        end = _object_end(body, start)
        if end is None:
            out.append((name, body[start:], False))
            return out
        out.append((name, body[start:end], True))
        i = end
        while i < n and body[i].isspace():
            i += 1
        if i >= n or body[i] != "}":
            return out
        i += 1


def _object_end(text: str, start: int) -> int | None:
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
