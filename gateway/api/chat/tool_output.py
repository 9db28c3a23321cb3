"""Generated text -> the wire shapes of tool calls: `message.tool_calls` (or the deprecated
`message.function_call`) and, streamed, `delta.tool_calls[]` with the id and name in a call's first delta
and its arguments in pieces.  finish_reason is "tool_calls" ("function_call") when a call was made and the
model stopped by itself; a budget that ran out stays "length"."""

from __future__ import annotations

from typing import Any

from gateway.api.chat import protocol as p
from gateway.api.chat.structured import Plan
from gateway.api.chat.tool_calls import CallEvent, ToolCallParser

__all__ = ["StreamedChoice", "final_message"]


def _finish(plan: Plan, called: bool, engine_finish: str | None) -> Any:
    if called and engine_finish in (None, "stop"):
        return "function_call" if plan.legacy else "tool_calls"
    return engine_finish or "stop"


def final_message(text: str, plan: Plan, engine_finish: str | None) -> tuple[p.ResponseMessage, Any]:
    parser = ToolCallParser("forced" if plan.tool_mode == "forced" else "auto")
    content, events = parser.feed(text)
    tail, more = parser.finish()
    content += tail
    calls: dict[int, list[str]] = {}  # index -> [id, name, arguments]
    for event in [*events, *more]:
        if event.id is not None:
            calls[event.index] = [event.id, event.name or "", ""]
        calls[event.index][2] += event.arguments
    tool_calls = [
        p.ToolCall(id=c[0], function=p.FunctionCall(name=c[1], arguments=c[2]))
        for _, c in sorted(calls.items())
    ]
    message = p.ResponseMessage(role="assistant", content=content.strip() or None)
    if not tool_calls:
        message.content = content
    elif plan.legacy:
        message.function_call = tool_calls[0].function
    else:
        message.tool_calls = tool_calls
    return message, _finish(plan, bool(tool_calls), engine_finish)


class StreamedChoice:
    """One choice of a streamed response: text deltas in -> chunk choices out."""

    def __init__(self, index: int, plan: Plan) -> None:
        self.index = index
        self.plan = plan
        self.parser = ToolCallParser("forced" if plan.tool_mode == "forced" else "auto")
        self.called = False

    def feed(self, text: str, logprobs: p.ChoiceLogprobs | None, finish: str | None) -> list[p.ChunkChoice]:
        content, events = self.parser.feed(text)
        out = self._chunks(content, events, logprobs)
        if finish is not None:
            content, events = self.parser.finish()
            out += self._chunks(content, events, None)
            out.append(
                p.ChunkChoice(
                    index=self.index, delta=p.Delta(), finish_reason=_finish(self.plan, self.called, finish)
                )
            )
        return out

    def _chunks(
        self, content: str, events: list[CallEvent], logprobs: p.ChoiceLogprobs | None
    ) -> list[p.ChunkChoice]:
        out = []
        if content or logprobs is not None:
            delta = p.Delta(content=content) if content else p.Delta()
            out.append(p.ChunkChoice(index=self.index, delta=delta, logprobs=logprobs))
        for event in events:
            self.called = True
            if self.plan.legacy:
                if event.index != 0:  # the deprecated shape holds one call
                    continue
                fn = p.FunctionCallDelta(name=event.name) if event.name is not None else p.FunctionCallDelta()
                if event.arguments or event.name is not None:
                    fn.arguments = event.arguments
                out.append(p.ChunkChoice(index=self.index, delta=p.Delta(function_call=fn)))
                continue
            if event.id is not None:
                call = p.ToolCallDelta(
                    index=event.index,
                    id=event.id,
                    type="function",
                    function=p.FunctionCallDelta(name=event.name or "", arguments=event.arguments),
                )
            else:
                call = p.ToolCallDelta(
                    index=event.index, function=p.FunctionCallDelta(arguments=event.arguments)
                )
            out.append(p.ChunkChoice(index=self.index, delta=p.Delta(tool_calls=[call])))
        return out
