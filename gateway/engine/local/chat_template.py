"""Messages (and tools) -> prompt token ids through the model's chat template.

A template that knows tools (it mentions `tools`, as Qwen's and Hermes' do) gets them, and the history's
tool calls, as it expects.  One that does not (SmolLM2's, the default model's) gets the documented fallback:
the functions in a system prompt, in the Hermes format that SmolLM2 was also trained on:

    <tools> one JSON function definition per line </tools>
    <tool_call>{"name": ..., "arguments": {...}}</tool_call>     (the model's answer, one per call)

and the history rendered the same way: an assistant's calls as `<tool_call>` blocks, a tool's result as a
user turn holding `<tool_response>...</tool_response>`.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.core.errors import InvalidRequest
from gateway.engine.base import ChatMessage

__all__ = ["FALLBACK_TOOL_PROMPT", "render_prompt", "template_supports_tools"]

FALLBACK_TOOL_PROMPT = (
    "You are a function calling AI model. You may call one or more functions to assist with the user query. "
    "Here are the functions you can call, as JSON schemas:\n<tools>\n{tools}\n</tools>\n"
    "For each function call, answer with a JSON object holding the function name and its arguments "
    'inside <tool_call></tool_call> tags:\n<tool_call>\n{{"name": <function-name>, "arguments": '
    "<args-json-object>}}\n</tool_call>"
)


def template_supports_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "tools" in template


def render_prompt(
    tokenizer: Any, messages: tuple[ChatMessage, ...], tools: tuple[dict[str, Any], ...]
) -> list[int]:
    native = template_supports_tools(tokenizer)
    rendered = [_native(m) for m in messages] if native else _fallback(messages, tools)
    kwargs: dict[str, Any] = {"add_generation_prompt": True}
    if native and tools:
        kwargs["tools"] = list(tools)
    try:
        encoded = tokenizer.apply_chat_template(rendered, **kwargs)
    except Exception as exc:  # a template that rejects a role order, for example
        raise InvalidRequest(
            f"the model's chat template rejected the messages: {exc}", param="messages"
        ) from exc
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
    return list(ids)


def _arguments(call: dict[str, Any]) -> Any:
    raw = (call.get("function") or {}).get("arguments", "{}")
    try:
        return json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return raw


def _native(message: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.get("id"),
                "type": "function",
                "function": {"name": (c.get("function") or {}).get("name"), "arguments": _arguments(c)},
            }
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    return out


def _fallback(messages: tuple[ChatMessage, ...], tools: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.content}\n</tool_response>"})
        elif m.tool_calls:
            calls = "\n".join(
                "<tool_call>\n"
                + json.dumps({"name": (c.get("function") or {}).get("name"), "arguments": _arguments(c)})
                + "\n</tool_call>"
                for c in m.tool_calls
            )
            out.append({"role": m.role, "content": f"{m.content}\n{calls}" if m.content else calls})
        else:
            out.append({"role": m.role, "content": m.content})
    if tools:
        prompt = FALLBACK_TOOL_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out
