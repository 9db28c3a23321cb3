"""Tool calls: the request plan (tool_choice -> grammar), the incremental parser and the wire shapes."""

from __future__ import annotations

import json

import jsonschema
import msgspec
import pytest

from gateway.api.chat import protocol as p
from gateway.api.chat.structured import plan_for
from gateway.api.chat.tool_calls import ToolCallParser
from gateway.api.chat.tool_output import StreamedChoice, final_message
from gateway.core.errors import InvalidRequest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "when": {"$ref": "#/$defs/When"}},
            "required": ["city"],
            "$defs": {"When": {"type": "string", "enum": ["now", "tomorrow"]}},
        },
    },
}


def _req(**fields: object) -> p.ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.json.decode(json.dumps(body).encode(), type=p.ChatCompletionRequest)


def _run(mode: str, text: str, step: int) -> tuple[str, dict[int, dict[str, str]], int]:
    parser = ToolCallParser(mode)  # type: ignore[arg-type]
    content, events = "", []
    for i in range(0, len(text), step):
        c, e = parser.feed(text[i : i + step])
        content, events = content + c, events + e
    c, e = parser.finish()
    content, events = content + c, events + e
    calls: dict[int, dict[str, str]] = {}
    for event in events:
        if event.id is not None:
            assert event.index not in calls  # id and name once, in the call's first event
            calls[event.index] = {"id": event.id, "name": event.name or "", "arguments": ""}
        calls[event.index]["arguments"] += event.arguments
    return content, calls, len(events)


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_forced_lists_stream_name_first_and_arguments_in_pieces(step: int) -> None:
    text = (
        '[{"name": "get_weather", "arguments": {"city": "Pa}ris", "d": [1, {"x": "]"}]}}, '
        '{"name": "b", "arguments": {}}]'
    )
    content, calls, events = _run("forced", text, step)
    assert content == ""
    assert [c["name"] for c in calls.values()] == ["get_weather", "b"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Pa}ris", "d": [1, {"x": "]"}]}
    assert calls[1]["arguments"] == "{}" and all(c["id"].startswith("call_") for c in calls.values())
    if step == 1:
        assert events > 10  # really incremental


def test_auto_parses_hermes_blocks_lists_and_any_key_order() -> None:
    text = (
        'Sure. <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
        '<tool_call>[{"arguments": {"q": "x"}, "name": "g"}]</tool_call> done'
    )
    content, calls, _ = _run("auto", text, 3)
    assert content == "Sure. \n done"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("f", {"a": 1}),
        ("g", {"q": "x"}),
    ]


def test_auto_text_without_calls_is_content_even_a_partial_tag() -> None:
    assert _run("auto", "no calls here <tool_ca", 2)[:2] == ("no calls here <tool_ca", {})
    assert _run("auto", 'bad <tool_call>{"oops"</tool_call> after', 5)[:2] == (
        'bad <tool_call>{"oops"</tool_call> after',
        {},
    )


def test_plan_for_required_named_and_none() -> None:
    plan = plan_for(_req(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False))
    assert plan.tool_mode == "forced" and plan.grammar is not None and plan.grammar_param == "tools"
    schema = json.loads(plan.grammar.schema)
    good = [{"name": "get_weather", "arguments": {"city": "Paris", "when": "now"}}]
    jsonschema.validate(good, schema)  # the hoisted $defs still resolve
    for bad in (
        [],
        good * 2,
        [{"name": "other", "arguments": {}}],
        [{"name": "get_weather", "arguments": {}}],
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    named = plan_for(
        _req(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    )
    assert json.loads(named.grammar.schema)["maxItems"] == 1  # type: ignore[union-attr]
    assert plan_for(_req(tools=[WEATHER], tool_choice="none")).tool_mode == "none"
    auto = plan_for(_req(tools=[WEATHER]))
    assert (
        auto.tool_mode == "auto"
        and auto.grammar is None
        and auto.tools[0]["function"]["name"] == "get_weather"
    )
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    assert plan_for(_req(response_format=fmt)).grammar.kind == "json_schema"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"functions": [WEATHER["function"]], "function_call": {"name": "x"}}, "function_call"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
    ],
)
def test_plan_rejects_what_cannot_be_served(fields: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        plan_for(_req(**fields))
    assert caught.value.param == param


def test_wire_shapes_for_calls_streamed_and_not() -> None:
    plan = plan_for(_req(tools=[WEATHER], tool_choice="required"))
    text = '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    message, finish = final_message(text, plan, "stop")
    assert finish == "tool_calls" and message.content is None and message.tool_calls
    assert message.tool_calls[0].function.arguments == '{"city": "Oslo"}'
    assert final_message(text[:20], plan, "length")[1] == "length"
    choice = StreamedChoice(0, plan)
    chunks = []
    for i in range(0, len(text), 5):
        chunks += choice.feed(text[i : i + 5], None, "stop" if i + 5 >= len(text) else None)
    wire = [msgspec.to_builtins(c) for c in chunks]
    assert (
        wire[0]["delta"]["tool_calls"][0]["id"].startswith("call_")
        and wire[-1]["finish_reason"] == "tool_calls"
    )
    args = "".join(w["delta"]["tool_calls"][0]["function"].get("arguments", "") for w in wire[:-1])
    assert json.loads(args) == {"city": "Oslo"}
    legacy = plan_for(_req(functions=[WEATHER["function"]], function_call={"name": "get_weather"}))
    message, finish = final_message(text, legacy, "stop")
    assert finish == "function_call" and message.function_call is not msgspec.UNSET
    assert message.tool_calls is msgspec.UNSET


def test_tool_call_shapes_match_the_spec() -> None:
    from tests.spec import validate

    plan = plan_for(_req(tools=[WEATHER], tool_choice="required"))
    text = '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    message, finish = final_message(text, plan, "stop")
    body = p.ChatCompletion(
        id="chatcmpl-1",
        created=1,
        model="m",
        choices=[p.Choice(index=0, message=message, logprobs=None, finish_reason=finish)],
        usage=p.Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
    )
    validate("CreateChatCompletionResponse", msgspec.to_builtins(body))
    choice = StreamedChoice(0, plan)
    for i in range(0, len(text), 7):
        for item in choice.feed(text[i : i + 7], None, "stop" if i + 7 >= len(text) else None):
            chunk = p.ChatCompletionChunk(id="chatcmpl-1", created=1, model="m", choices=[item])
            validate("CreateChatCompletionStreamResponse", msgspec.to_builtins(chunk))
    legacy = plan_for(_req(functions=[WEATHER["function"]], function_call={"name": "get_weather"}))
    message, finish = final_message(text, legacy, "stop")
    body.choices = [p.Choice(index=0, message=message, logprobs=None, finish_reason=finish)]
    validate("CreateChatCompletionResponse", msgspec.to_builtins(body))
