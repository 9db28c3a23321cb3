"""A Responses request as a chat completion request, and a chat completion as Responses output items.

There is one generation path (the chat service); this module is the whole difference between the two APIs:

    instructions                     -> a leading developer message
    input (a string)                 -> one user message
    {role, content[input_text|output_text]} -> a chat message with text parts
    function_call items (in a row)   -> one assistant message with tool_calls
    function_call_output             -> a tool message (tool_call_id = call_id)
    max_output_tokens                -> max_completion_tokens
    text.format                      -> response_format (json_schema wrapped in {"json_schema": ...})
    tools [{type: function, name..}] -> tools [{type: function, function: {name..}}] (strict defaults true)
    tool_choice {type: function, name} -> {type: function, function: {name}}

    chat message.content             -> an output message with one output_text part
    chat message.tool_calls[i]       -> a function_call item each (call_id = the tool call's id)
    finish_reason "length"           -> status incomplete, incomplete_details.reason max_output_tokens

`ChatTranslation.param` maps an error the chat service raised about `messages[3].content[0]` back to the
Responses field the client sent (`input[2].content[0]`).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from msgspec import Struct

from gateway.api.responses import protocol as p
from gateway.core.errors import InvalidRequest

__all__ = [
    "ChatCompletionView",
    "ChatTranslation",
    "error_path",
    "new_id",
    "output_items",
    "refuse_stored_state",
    "to_chat",
]

_TEXT_PARTS = {"input_text", "output_text", "text"}  # "text": what a chat-style client may send
_ERROR_AT = re.compile(r"at `\$\.?([^`]*)`")
_ERROR_MISSING = re.compile(r"missing required field `(\w+)`")
_MESSAGE_PARAM = re.compile(r"^messages\[(\d+)\](.*)$")
_PARAM_NAMES = {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens"}
_ITEM_KINDS: dict[str, type[Struct]] = {
    "message": p.InputMessage,
    "function_call": p.FunctionCallInput,
    "function_call_output": p.FunctionCallOutputInput,
}


@dataclass
class ChatTranslation:
    body: dict[str, Any]  # the chat completion request, in its wire shape
    origins: list[str] = field(default_factory=list)  # per chat message: the Responses field it came from

    def param(self, chat_param: str | None) -> str | None:
        """A chat request field path as the Responses field it came from."""
        if chat_param is None:
            return None
        if chat_param in _PARAM_NAMES:
            return _PARAM_NAMES[chat_param]
        if chat_param.startswith("response_format"):
            return "text.format" + chat_param.removeprefix("response_format").removeprefix(".json_schema")
        if chat_param.startswith("tools[") and ".function" in chat_param:
            return chat_param.replace(".function", "", 1)
        match = _MESSAGE_PARAM.match(chat_param)
        if match and int(match.group(1)) < len(self.origins):
            origin = self.origins[int(match.group(1))]
            # a message made from a whole string field has no deeper path to point at
            return origin + match.group(2) if origin.startswith("input[") else origin
        return chat_param


def to_chat(req: p.ResponseRequest, chat_fields: Collection[str]) -> ChatTranslation:
    """The chat completion request for `req`.  `chat_fields`: what the chat request type declares; a
    Responses feature whose chat counterpart is missing there is a 400 here (never silently dropped)."""
    out = ChatTranslation(body={"model": req.model, "messages": []})
    if req.instructions:
        _append(out, {"role": "developer", "content": req.instructions}, "instructions")
    if isinstance(req.input, str):
        _append(out, {"role": "user", "content": req.input}, "input")
    else:
        _input_items(out, req.input, chat_fields)
    body = out.body
    for name in ("temperature", "top_p", "seed", "user", "parallel_tool_calls"):
        value = getattr(req, name)
        if value is not None:
            body[name] = value
    if req.max_output_tokens is not None:
        body["max_completion_tokens"] = req.max_output_tokens
    if req.text is not None and req.text.format is not msgspec.UNSET:
        response_format = _response_format(req.text.format)
        if response_format["type"] != "text" or "response_format" in chat_fields:
            _needs(
                chat_fields, "response_format", "text.format", f"text.format type '{response_format['type']}'"
            )
            body["response_format"] = response_format
    if req.tools:
        tools = [_tool(i, tool) for i, tool in enumerate(req.tools)]  # a built-in tool is refused first
        _needs(chat_fields, "tools", "tools", "function tools")
        body["tools"] = tools
    if req.tool_choice is not None:
        choice = _tool_choice(req.tool_choice)
        if req.tools:
            _needs(chat_fields, "tool_choice", "tool_choice", "tool_choice")
            body["tool_choice"] = choice
        elif choice not in ("none", "auto"):  # "auto" or "none" with no tools: nothing to choose from
            raise InvalidRequest("tool_choice requires `tools` to choose from.", param="tool_choice")
    return out


def refuse_stored_state(req: p.ResponseRequest) -> None:
    """Everything in a request that would need a response or conversation kept on the server."""
    why = "this gateway stores no responses (privacy): send the whole conversation as `input` instead"
    if req.store:
        raise InvalidRequest(f"store: true is not supported; {why}.", param="store")
    if req.previous_response_id is not None:
        raise InvalidRequest(f"previous_response_id is not supported; {why}.", param="previous_response_id")
    if req.conversation is not None:
        raise InvalidRequest(f"conversation is not supported; {why}.", param="conversation")
    if req.background:
        raise InvalidRequest(
            f"background: true is not supported; {why}. Use stream: true for long answers.",
            param="background",
        )
    if req.prompt is not None:
        raise InvalidRequest(
            "Stored prompt templates are not supported: this gateway stores no prompts. Send the prompt's "
            "text as `instructions` and `input`.",
            param="prompt",
        )


def _needs(chat_fields: Collection[str], chat_name: str, param: str, what: str) -> None:
    if chat_name not in chat_fields:
        raise InvalidRequest(f"{what} is not supported by this server yet.", param=param)


def _append(out: ChatTranslation, message: dict[str, Any], origin: str) -> None:
    out.body["messages"].append(message)
    out.origins.append(origin)


def _input_items(out: ChatTranslation, items: list[dict[str, Any]], chat_fields: Collection[str]) -> None:
    for index, raw in enumerate(items):
        param = f"input[{index}]"
        kind = raw.get("type", "message")
        if kind not in _ITEM_KINDS:
            stored = (
                " (items are looked up on the server, which stores none)" if kind == "item_reference" else ""
            )
            raise InvalidRequest(
                f"Input items of type {kind!r} are not supported{stored}; send messages, function_call and "
                "function_call_output items.",
                param=f"{param}.type",
            )
        item = _convert(raw, _ITEM_KINDS[kind], param)
        if isinstance(item, p.InputMessage):
            _append(out, {"role": item.role, "content": _parts(item.content, param)}, param)
        elif isinstance(item, p.FunctionCallInput):
            _needs(chat_fields, "tools", param, "function_call input items")
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            previous = out.body["messages"][-1] if out.body["messages"] else None
            if previous is not None and previous.get("tool_calls") and out.origins[-1].startswith("input["):
                previous["tool_calls"].append(call)  # calls made in one turn are one assistant message
            else:
                _append(out, {"role": "assistant", "content": None, "tool_calls": [call]}, param)
        else:
            assert isinstance(item, p.FunctionCallOutputInput)
            _needs(chat_fields, "tools", param, "function_call_output input items")
            output = item.output if isinstance(item.output, str) else _parts(item.output, f"{param}.output")
            _append(out, {"role": "tool", "tool_call_id": item.call_id, "content": output}, param)


def error_path(exc: msgspec.ValidationError) -> str | None:
    """The field a msgspec validation error is about, as a dotted path (`messages[0].content`)."""
    message = str(exc)
    path, missing = _ERROR_AT.search(message), _ERROR_MISSING.search(message)
    parts = [m.group(1) for m in (path, missing) if m and m.group(1)]
    return ".".join(parts) or None


def _convert(raw: dict[str, Any], kind: type[Struct], param: str) -> Any:
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        suffix = error_path(exc)
        raise InvalidRequest(
            f"Invalid input item: {exc}", param=f"{param}.{suffix}" if suffix else param
        ) from None


def _parts(content: str | list[dict[str, Any]], param: str) -> str | list[dict[str, str]]:
    """Responses text parts as chat text parts, one for one (so a chat error's part index still fits)."""
    if isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content):
        text = part.get("text")
        if part.get("type") not in _TEXT_PARTS or not isinstance(text, str):
            raise InvalidRequest(
                f"Only text content parts (input_text, output_text) are supported by this server; got "
                f"{part.get('type')!r}.",
                param=f"{param}.content[{j}]",
            )
        parts.append({"type": "text", "text": text})
    return parts


def _response_format(fmt: dict[str, Any]) -> dict[str, Any]:
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind != "json_schema":
        raise InvalidRequest(
            "text.format.type must be one of 'text', 'json_object' or 'json_schema'.",
            param="text.format.type",
        )
    if not isinstance(fmt.get("name"), str) or not fmt["name"]:
        raise InvalidRequest("text.format.name is required for json_schema.", param="text.format.name")
    if not isinstance(fmt.get("schema"), dict):
        raise InvalidRequest("text.format.schema must be a JSON Schema object.", param="text.format.schema")
    schema = {k: fmt[k] for k in ("name", "schema", "description", "strict") if fmt.get(k) is not None}
    return {"type": "json_schema", "json_schema": schema}


def _tool(index: int, tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise InvalidRequest(
            f"Only function tools are supported by this server; got {tool.get('type')!r} (built-in tools "
            "such as web or file search would reach outside the gateway).",
            param=f"tools[{index}].type",
        )
    if not isinstance(tool.get("name"), str) or not tool["name"]:
        raise InvalidRequest("A function tool needs a name.", param=f"tools[{index}].name")
    function: dict[str, Any] = {"name": tool["name"], "strict": tool.get("strict") is not False}
    if tool.get("description") is not None:
        function["description"] = tool["description"]
    function["parameters"] = tool.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


def _tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidRequest(
                "tool_choice must be 'none', 'auto', 'required' or {type: function, name}.",
                param="tool_choice",
            )
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequest(
        f"tool_choice of type {choice.get('type')!r} is not supported; use 'none', 'auto', 'required' or "
        "{type: function, name}.",
        param="tool_choice",
    )


# -- chat completion -> output items ---------------------------------------------------------------------


class ChatFunction(Struct, frozen=True):
    name: str = ""
    arguments: str = ""


class ChatToolCall(Struct):
    id: str = ""
    function: ChatFunction = ChatFunction()


class ChatMessageView(Struct):
    content: str | None = None
    tool_calls: list[ChatToolCall] | None = None


class ChatChoiceView(Struct):
    message: ChatMessageView
    finish_reason: str | None = None


class ChatUsageView(Struct, frozen=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ChatCompletionView(Struct):
    """What this module reads of a chat completion (the chat types may grow; this reads only these)."""

    choices: list[ChatChoiceView]
    usage: ChatUsageView = ChatUsageView()


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def output_items(message: ChatMessageView, finish_reason: str | None) -> list[p.OutputItem]:
    """The output items of one chat answer: its text as a message (always when there is no tool call, as
    OpenAI answers with an empty message rather than none), then each tool call as a function_call."""
    status: Literal["completed", "incomplete"] = "incomplete" if finish_reason == "length" else "completed"
    items: list[p.OutputItem] = []
    if message.content or not message.tool_calls:
        text = p.OutputText(text=message.content or "")
        items.append(p.OutputMessage(id=new_id("msg"), status=status, content=[text]))
    for call in message.tool_calls or []:
        items.append(
            p.FunctionCallOutput(
                id=new_id("fc"),
                call_id=call.id or new_id("call"),
                name=call.function.name,
                arguments=call.function.arguments,
                status=status,
            )
        )
    return items
