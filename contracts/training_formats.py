"""The two training record formats, one decoded JSON record -> a `Conversation` of `Turn`s.

- chat (OpenAI fine-tuning JSONL): `{"messages": [{"role", "content", "weight"?}, ...]}`
- alpaca (LLaMA-Factory): `{"instruction", "input"?, "output", "system"?, "history"?: [[user, reply], ...]}`

Kept apart from reading files (contracts.training_data) so that what a record may hold is stated in one
place.  A problem raises InvalidRecord naming the field, never quoting it; the reader adds the line.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

__all__ = ["ROLES", "Conversation", "Format", "InvalidRecord", "Turn", "parse_record"]

ROLES = ("system", "user", "assistant", "developer", "tool")
Format = Literal["chat", "alpaca"]


class Turn(NamedTuple):
    role: str  # system | user | assistant | tool ("developer" is read as "system")
    text: str
    trainable: bool  # an assistant turn the loss learns from


Conversation = list[Turn]


class InvalidRecord(Exception):
    """A record-level problem; the file reader adds the line."""


def parse_record(obj: Any) -> tuple[Format, Conversation]:
    if not isinstance(obj, dict):
        raise InvalidRecord("a record must be a JSON object")
    if "messages" in obj:
        return "chat", _parse_chat(obj["messages"])
    if "instruction" in obj or "output" in obj:
        return "alpaca", _parse_alpaca(obj)
    raise InvalidRecord('expected "messages" (chat format) or "instruction" and "output" (Alpaca format)')


def _parse_chat(messages: Any) -> Conversation:
    if not isinstance(messages, list):
        raise InvalidRecord('"messages" must be a list')
    if not messages:
        raise InvalidRecord('"messages" is empty')
    turns: Conversation = []
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRecord(f"{field} must be an object")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRecord(f"{field}.role must be one of {', '.join(ROLES)}")
        if message.get("tool_calls") or message.get("function_call"):
            raise InvalidRecord(f"{field} has tool calls, which fine-tuning does not support yet")
        text = _content_text(message.get("content"), f"{field}.content")
        weight = message.get("weight", 1)
        if "weight" in message and role != "assistant":
            raise InvalidRecord(f"{field}.weight is only allowed on assistant messages")
        if type(weight) is not int or weight not in (0, 1):
            raise InvalidRecord(f"{field}.weight must be 0 or 1")
        trainable = role == "assistant" and weight == 1
        if trainable and not text.strip():
            raise InvalidRecord(f"{field}.content is empty; give the assistant a reply or set weight 0")
        turns.append(Turn("system" if role == "developer" else role, text, trainable))
    if not any(turn.trainable for turn in turns):
        raise InvalidRecord("no assistant message to learn from (all are missing or have weight 0)")
    return turns


def _content_text(content: Any, field: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise InvalidRecord(f'{field}[{j}] must be a text part: {{"type": "text", "text": "..."}}')
            texts.append(part["text"])
        return "".join(texts)
    if content is None:
        raise InvalidRecord(f"{field} is missing")
    raise InvalidRecord(f"{field} must be a string or a list of text parts")


def _parse_alpaca(obj: dict[str, Any]) -> Conversation:
    instruction = _string_field(obj, "instruction", required=True)
    extra_input = _string_field(obj, "input", required=False)
    output = _string_field(obj, "output", required=True)
    system = _string_field(obj, "system", required=False)
    prompt = "\n".join(part for part in (instruction, extra_input) if part)
    if not prompt.strip():
        raise InvalidRecord('"instruction" and "input" are both empty')
    if not output.strip():
        raise InvalidRecord('"output" is empty')
    turns: Conversation = [Turn("system", system, False)] if system else []
    history = obj.get("history")
    if history is not None and not isinstance(history, list):
        raise InvalidRecord('"history" must be a list of [user, assistant] pairs')
    for i, pair in enumerate(history or []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise InvalidRecord(f"history[{i}] must be a [user, assistant] pair of strings")
        turns += [Turn("user", pair[0], False), Turn("assistant", pair[1], bool(pair[1].strip()))]
    return [*turns, Turn("user", prompt, False), Turn("assistant", output, True)]


def _string_field(obj: dict[str, Any], name: str, *, required: bool) -> str:
    value = obj.get(name)
    if value is None:
        if required:
            raise InvalidRecord(f'missing "{name}"')
        return ""
    if not isinstance(value, str):
        raise InvalidRecord(f'"{name}" must be a string')
    return value
