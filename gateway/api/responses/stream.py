"""A chat completion stream (SSE chunks) re-told as the Responses event sequence.

    response.created -> response.in_progress
      per output item, in order (the previous one is finished when the next one starts):
        message:        output_item.added -> content_part.added -> output_text.delta ... ->
                        output_text.done -> content_part.done -> output_item.done
        function_call:  output_item.added -> function_call_arguments.delta ... ->
                        function_call_arguments.done -> output_item.done
    -> response.completed (or response.incomplete when the token budget ran out)

An error the chat stream reports in-band (the headers are sent) becomes an `error` event and
`response.failed`.  Every event carries `sequence_number`, from 0.  Closing this stream (the client went
away) closes the chat stream, which aborts the generation.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import structlog
from msgspec import Struct

from gateway.api.responses import protocol as p
from gateway.api.responses.translate import new_id

__all__ = ["response_events"]

log = structlog.get_logger(__name__)

_ERROR_CODES = {"rate_limit_exceeded": "rate_limit_exceeded"}  # anything else is the spec's server_error


class _FunctionDelta(Struct, frozen=True):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(Struct):
    index: int = 0
    id: str | None = None
    function: _FunctionDelta | None = None


class _Delta(Struct, frozen=True):
    content: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


class _Choice(Struct):
    delta: _Delta = _Delta()
    finish_reason: str | None = None


class _Usage(Struct, frozen=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Chunk(Struct):
    """One `data:` payload of a chat stream: a chunk, or the in-band error envelope."""

    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: dict[str, Any] | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_encode = msgspec.json.Encoder().encode


class _Events:
    """Builds the events in order: the open output item, the finished ones, the sequence counter."""

    def __init__(self, response: p.Response) -> None:
        self.response = response
        self.items: list[p.OutputItem] = []
        self.open: p.OutputItem | None = None
        self.text = ""
        self.calls: dict[int, p.FunctionCallOutput] = {}  # the chat stream's tool call index -> item
        self.finish_reason: str | None = None
        self.usage = _Usage()
        self._sequence = 0

    def emit(self, event: Any) -> bytes:
        event.sequence_number = self._sequence
        self._sequence += 1
        return (
            b"event: " + type(event).__struct_config__.tag.encode() + b"\ndata: " + _encode(event) + b"\n\n"
        )

    def _add(self, item: p.OutputItem) -> list[bytes]:
        out = self.close("completed")
        self.open = item
        self.items.append(item)
        out.append(self.emit(p.OutputItemAdded(output_index=len(self.items) - 1, item=item)))
        return out

    def _open_message(self) -> tuple[p.OutputMessage, list[bytes]]:
        if isinstance(self.open, p.OutputMessage):
            return self.open, []
        message = p.OutputMessage(id=new_id("msg"), status="in_progress", content=[])
        out = self._add(message)
        self.text = ""
        out.append(self.emit(p.ContentPartAdded(message.id, len(self.items) - 1, 0, p.OutputText(""))))
        return message, out

    def text_delta(self, piece: str) -> list[bytes]:
        message, out = self._open_message()
        self.text += piece
        out.append(self.emit(p.OutputTextDelta(message.id, len(self.items) - 1, 0, piece)))
        return out

    def tool_delta(self, delta: _ToolCallDelta) -> list[bytes]:
        out = []
        call = self.calls.get(delta.index)
        function = delta.function or _FunctionDelta()
        if call is None:
            call = p.FunctionCallOutput(
                id=new_id("fc"),
                call_id=delta.id or new_id("call"),
                name=function.name or "",
                arguments="",
                status="in_progress",
            )
            self.calls[delta.index] = call
            out += self._add(call)
        elif call is not self.open:  # the chat stream sends each call whole before the next; keep it so
            log.warning("responses.stream.late_tool_call_delta", index=delta.index)
            return out
        if function.name and not call.name:
            call.name = function.name
        if function.arguments:
            call.arguments += function.arguments
            out.append(
                self.emit(p.FunctionCallArgumentsDelta(call.id, len(self.items) - 1, function.arguments))
            )
        return out

    def close(self, status: str) -> list[bytes]:
        """Finish the open output item, if any, with `status`."""
        item, self.open = self.open, None
        if item is None:
            return []
        index = self.items.index(item)
        out = []
        if isinstance(item, p.OutputMessage):
            part = p.OutputText(self.text)
            out.append(self.emit(p.OutputTextDone(item.id, index, 0, self.text)))
            out.append(self.emit(p.ContentPartDone(item.id, index, 0, part)))
            item.content = [part]
        else:
            out.append(self.emit(p.FunctionCallArgumentsDone(item.id, index, item.name, item.arguments)))
        item.status = status  # type: ignore[assignment]
        out.append(self.emit(p.OutputItemDone(output_index=index, item=item)))
        return out

    def finish(self) -> list[bytes]:
        incomplete = self.finish_reason == "length"
        # no text and no call: an empty message, as the non-streamed answer has
        out = self._open_message()[1] if not self.items else []
        out += self.close("incomplete" if incomplete else "completed")
        usage = p.ResponseUsage(
            input_tokens=self.usage.prompt_tokens,
            output_tokens=self.usage.completion_tokens,
            total_tokens=self.usage.prompt_tokens + self.usage.completion_tokens,
        )
        final = msgspec.structs.replace(
            self.response,
            status="incomplete" if incomplete else "completed",
            output=self.items,
            usage=usage,
            completed_at=None if incomplete else int(time.time()),
            incomplete_details=p.IncompleteDetails("max_output_tokens") if incomplete else None,
        )
        event = p.ResponseIncomplete(final) if incomplete else p.ResponseCompleted(final)
        out.append(self.emit(event))
        return out

    def fail(self, error: dict[str, Any]) -> list[bytes]:
        message = str(error.get("message") or "The server had an error while processing your request.")
        code = error.get("code")
        failed = msgspec.structs.replace(
            self.response,
            status="failed",
            output=self.items,
            error=p.ResponseError(code=_ERROR_CODES.get(str(code), "server_error"), message=message),
        )
        return [
            self.emit(p.ErrorEvent(message=message, code=code, param=error.get("param"))),
            self.emit(p.ResponseFailed(failed)),
        ]


async def response_events(chat_sse: AsyncIterator[bytes], response: p.Response) -> AsyncIterator[bytes]:
    """The Responses SSE body for `chat_sse` (the chat service's stream, asked for usage), `response` the
    in-progress Response object the events describe."""
    events = _Events(response)
    try:
        yield events.emit(p.ResponseCreated(response))
        yield events.emit(p.ResponseInProgress(response))
        async for raw in chat_sse:
            payload = raw.removeprefix(b"data: ").strip()
            if payload == b"[DONE]":
                break
            chunk = _decode_chunk(payload)
            if chunk.error is not None:
                for event in events.fail(chunk.error):
                    yield event
                return
            if chunk.usage is not None:
                events.usage = chunk.usage
            for choice in chunk.choices:
                out: list[bytes] = []
                if choice.delta.content:
                    out += events.text_delta(choice.delta.content)
                for call in choice.delta.tool_calls or []:
                    out += events.tool_delta(call)
                if choice.finish_reason is not None:
                    events.finish_reason = choice.finish_reason
                for event in out:
                    yield event
        for event in events.finish():
            yield event
    finally:
        close = getattr(chat_sse, "aclose", None)
        if close is not None:
            await close()
