"""POST /v1/responses: the translation to a chat request and back, the event sequence, the stored-state 400s,
and the route through the real app (guards, audit, chat service) on a fake engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import TestClient

from gateway.api.responses import protocol as p
from gateway.api.responses.service import CHAT_FIELDS
from gateway.api.responses.stream import response_events
from gateway.api.responses.translate import ChatMessageView, ChatToolCall, output_items, to_chat
from gateway.app import create_app, services_of
from gateway.audit.log import AuditLog
from gateway.auth.keys import ensure_dev_keys
from gateway.auth.tokens import mint_dev_token
from gateway.core.errors import InvalidRequest
from gateway.core.settings import Settings
from tests.spec import validate
from tests.unit.fake_engine import FakeEngine

MODEL = "smollm2-135m-instruct"
PLAIN_CHAT = frozenset({"model", "messages", "max_completion_tokens", "temperature", "top_p", "seed", "user"})
AGENT_CHAT = PLAIN_CHAT | {"response_format", "tools", "tool_choice", "parallel_tool_calls"}
EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
    "error": "ResponseErrorEvent",
}
TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def request(**fields: Any) -> p.ResponseRequest:
    return msgspec.convert({"model": MODEL, "input": "Hi", **fields}, p.ResponseRequest)


def parse_sse(body: str) -> list[dict[str, Any]]:
    """Each event's data, checked against its `event:` line and its schema in the vendored spec."""
    events = []
    for block in body.strip().split("\n\n"):
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        validate(EVENT_SCHEMAS[event["type"]], event)
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


# -- request translation ---------------------------------------------------------------------------------


def test_text_input_and_instructions_become_messages_and_sampling_carries_over() -> None:
    req = request(
        instructions="Be brief.", max_output_tokens=20, temperature=0.2, top_p=0.9, seed=7, user="u1"
    )
    body = to_chat(req, PLAIN_CHAT).body
    assert body["messages"] == [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert (body["max_completion_tokens"], body["temperature"], body["top_p"], body["seed"]) == (
        20,
        0.2,
        0.9,
        7,
    )
    assert body["user"] == "u1" and "response_format" not in body and "tools" not in body


def test_message_items_with_text_parts_and_roles() -> None:
    items = [
        {"role": "system", "content": "S"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Q1"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "A1", "annotations": []}]},
        {"role": "developer", "content": "D"},
    ]
    body = to_chat(request(input=items), PLAIN_CHAT).body
    assert body["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "text", "text": "Q1"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
        {"role": "developer", "content": "D"},
    ]


def test_function_calls_and_outputs_become_tool_calls_and_tool_messages() -> None:
    items = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "weather", "arguments": '{"city":"Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]},
    ]
    translation = to_chat(request(input=items), AGENT_CHAT)
    messages = translation.body["messages"]
    assert messages[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
            },
            {"id": "c2", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Rome"}'}},
        ],
    }
    assert messages[2] == {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
    assert messages[3] == {
        "role": "tool",
        "tool_call_id": "c2",
        "content": [{"type": "text", "text": "rain"}],
    }
    assert translation.origins == ["input[0]", "input[1]", "input[3]", "input[4]"]


def test_text_format_tools_and_tool_choice_map_to_the_chat_shapes() -> None:
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    tool = {"type": "function", "name": "f", "description": "d", "parameters": schema}
    req = request(
        text={"format": {"type": "json_schema", "name": "Out", "schema": schema, "strict": True}},
        tools=[tool, {**tool, "name": "g", "strict": False}],
        tool_choice={"type": "function", "name": "f"},
        parallel_tool_calls=False,
    )
    body = to_chat(req, AGENT_CHAT).body
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "Out", "schema": schema, "strict": True},
    }
    assert body["tools"] == [
        {
            "type": "function",
            "function": {"name": "f", "strict": True, "description": "d", "parameters": schema},
        },
        {
            "type": "function",
            "function": {"name": "g", "strict": False, "description": "d", "parameters": schema},
        },
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert body["parallel_tool_calls"] is False
    assert to_chat(request(text={"format": {"type": "json_object"}}), AGENT_CHAT).body["response_format"] == {
        "type": "json_object"
    }
    assert (
        to_chat(request(tool_choice="required", tools=[tool]), AGENT_CHAT).body["tool_choice"] == "required"
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"text": {"format": {"type": "json_schema", "name": "X", "schema": {}}}}, "text.format"),
        ({"text": {"format": {"type": "json_object"}}}, "text.format"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]}, "input[0]"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input[0]"),
    ],
)
def test_a_chat_service_without_the_feature_answers_400_naming_the_field(
    fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        to_chat(request(**fields), PLAIN_CHAT)
    assert refused.value.param == param and "not supported by this server yet" in refused.value.message
    # plain text output and tool_choice "none" without tools need nothing of the chat side
    assert "response_format" not in to_chat(request(text={"format": {"type": "text"}}), PLAIN_CHAT).body
    assert "tool_choice" not in to_chat(request(tool_choice="none"), PLAIN_CHAT).body
    assert "tool_choice" not in to_chat(request(tool_choice="auto"), PLAIN_CHAT).body


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0]",
        ),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "function"}]}, "tools[0].name"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),  # and no tools
        ({"tool_choice": {"type": "function", "name": "f"}}, "tool_choice"),
        ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
        ({"text": {"format": {"type": "json_schema", "name": "X"}}}, "text.format.schema"),
    ],
)
def test_unsupported_or_malformed_fields_are_400s_with_their_path(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        to_chat(request(**fields), AGENT_CHAT)
    assert refused.value.param == param


def test_a_built_in_tool_is_refused_as_such_whatever_the_chat_side_has() -> None:
    with pytest.raises(InvalidRequest) as refused:
        to_chat(request(tools=[{"type": "web_search"}]), PLAIN_CHAT)
    assert refused.value.param == "tools[0].type" and "Only function tools" in refused.value.message


def test_chat_error_params_point_back_at_the_responses_fields() -> None:
    items = [
        {"role": "user", "content": "a"},
        {
            "role": "user",
            "content": [{"type": "input_text", "text": "b"}, {"type": "input_text", "text": "c"}],
        },
    ]
    translation = to_chat(request(input=items, instructions="i"), PLAIN_CHAT)
    assert translation.param("messages[0]") == "instructions"
    assert translation.param("messages[2].content[1]") == "input[1].content[1]"
    assert translation.param("max_tokens") == "max_output_tokens"
    assert translation.param("response_format.json_schema.schema") == "text.format.schema"
    assert translation.param("tools[1].function.parameters") == "tools[1].parameters"
    assert translation.param("model") == "model" and translation.param(None) is None
    assert to_chat(request(), PLAIN_CHAT).param("messages[0].content") == "input"


# -- chat answer -> output items --------------------------------------------------------------------------


def test_output_items_text_tool_calls_and_length() -> None:
    [message] = output_items(ChatMessageView(content="Paris"), "stop")
    assert isinstance(message, p.OutputMessage) and message.status == "completed"
    assert message.id.startswith("msg_") and message.content == [p.OutputText("Paris")]
    [empty] = output_items(ChatMessageView(content=None), "stop")  # never an empty output list
    assert isinstance(empty, p.OutputMessage) and empty.content[0].text == ""
    [cut] = output_items(ChatMessageView(content="Par"), "length")
    assert cut.status == "incomplete"
    calls = ChatMessageView(
        content=None,
        tool_calls=[
            msgspec.convert(
                {"id": "call_1", "function": {"name": "f", "arguments": '{"x": 1}'}}, ChatToolCall
            )
        ],
    )
    [call] = output_items(calls, "tool_calls")
    assert isinstance(call, p.FunctionCallOutput)
    assert (call.call_id, call.name, call.arguments, call.status) == ("call_1", "f", '{"x": 1}', "completed")
    assert call.id.startswith("fc_")
    for item in (message, empty, cut, call):
        validate("OutputItem", msgspec.to_builtins(item))


# -- the event sequence -----------------------------------------------------------------------------------


def _in_progress() -> p.Response:
    return p.Response(
        id="resp_1", created_at=1, status="in_progress", model=MODEL, output=[], instructions=None,
        max_output_tokens=None, temperature=1.0, top_p=1.0, tools=[], tool_choice="auto",
        parallel_tool_calls=True, text={"format": {"type": "text"}}, metadata={},
    )  # fmt: skip


class ChatSSE:
    """A chat service stream: the given chunk payloads as `data:` events, then [DONE]; remembers closing."""

    def __init__(self, *payloads: dict[str, Any], done: bool = True) -> None:
        self.events = [b"data: " + json.dumps(x).encode() + b"\n\n" for x in payloads]
        if done:
            self.events.append(b"data: [DONE]\n\n")
        self.closed = False

    async def _run(self) -> AsyncIterator[bytes]:
        for event in self.events:
            yield event

    def __aiter__(self) -> AsyncIterator[bytes]:
        self._iterator = self._run()
        return self._iterator

    async def aclose(self) -> None:
        self.closed = True


def chunk(
    delta: dict[str, Any] | None = None, finish: str | None = None, usage: Any = None
) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"object": "chat.completion.chunk", "choices": choices, "usage": usage}


def collect(chat: ChatSSE) -> list[dict[str, Any]]:
    async def run() -> bytes:
        return b"".join([event async for event in response_events(chat, _in_progress())])

    return parse_sse(asyncio.run(run()).decode())


def test_text_stream_follows_the_typed_event_order() -> None:
    chat = ChatSSE(
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Par"}),
        chunk({"content": "is"}),
        chunk({}, "stop"),
        chunk(usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}),
    )
    events = collect(chat)
    assert [e["type"] for e in events] == TEXT_EVENTS
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    final = events[-1]["response"]
    assert deltas == "Paris" == events[6]["text"] == final["output"][0]["content"][0]["text"]
    assert final["status"] == "completed" and final["completed_at"] is not None
    assert final["usage"]["input_tokens"] == 5 and final["usage"]["output_tokens"] == 3
    assert final["usage"]["total_tokens"] == 8
    assert events[0]["response"]["status"] == "in_progress" and "usage" not in events[0]["response"]
    item_ids = {e["item_id"] for e in events if "item_id" in e}
    assert item_ids == {events[2]["item"]["id"]} == {final["output"][0]["id"]}
    assert chat.closed


def test_length_ends_with_response_incomplete() -> None:
    events = collect(
        ChatSSE(
            chunk({"content": "Once"}),
            chunk({}, "length"),
            chunk(usage={"prompt_tokens": 2, "completion_tokens": 1}),
        )
    )
    assert events[-1]["type"] == "response.incomplete"
    final = events[-1]["response"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["status"] == "incomplete" and final["completed_at"] is None


def test_an_empty_answer_still_has_one_empty_message() -> None:
    events = collect(ChatSSE(chunk({"role": "assistant", "content": ""}), chunk({}, "stop")))
    assert [e["type"] for e in events] == [t for t in TEXT_EVENTS if t != "response.output_text.delta"]
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == ""


def test_tool_call_stream_becomes_function_call_items() -> None:
    def call(index: int, **fields: Any) -> dict[str, Any]:
        return {"tool_calls": [{"index": index, **fields}]}

    events = collect(
        ChatSSE(
            chunk({"content": "Let me check."}),
            chunk(call(0, id="call_a", type="function", function={"name": "weather", "arguments": ""})),
            chunk(call(0, function={"arguments": '{"city": '})),
            chunk(call(0, function={"arguments": '"Paris"}'})),
            chunk(call(1, id="call_b", type="function", function={"name": "time", "arguments": "{}"})),
            chunk({}, "tool_calls"),
            chunk(usage={"prompt_tokens": 9, "completion_tokens": 12}),
        )
    )
    kinds = [e["type"] for e in events]
    assert kinds[2:] == [
        "response.output_item.added",  # the message
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",  # call_a
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",  # call_b
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    output = events[-1]["response"]["output"]
    assert [o["type"] for o in output] == ["message", "function_call", "function_call"]
    assert (output[1]["call_id"], output[1]["name"], output[1]["arguments"]) == (
        "call_a",
        "weather",
        '{"city": "Paris"}',
    )
    assert (output[2]["call_id"], output[2]["name"], output[2]["arguments"]) == ("call_b", "time", "{}")
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.added"] == [0, 1, 2]
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [d["arguments"] for d in done] == ['{"city": "Paris"}', "{}"]


def test_an_in_band_chat_error_becomes_error_and_response_failed() -> None:
    error = {
        "error": {"message": "engine stopped", "type": "server_error", "param": None, "code": "engine_error"}
    }
    chat = ChatSSE(chunk({"content": "Par"}), error, done=False)
    events = collect(chat)
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    assert events[-2]["message"] == "engine stopped" and events[-2]["code"] == "engine_error"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"] == {
        "code": "server_error",
        "message": "engine stopped",
    }
    assert chat.closed


# -- through the app ---------------------------------------------------------------------------------------


@dataclass
class App:
    client: TestClient[Any]
    headers: dict[str, str]
    engine: FakeEngine
    audit: AuditLog

    def records(self) -> list[dict[str, Any]]:
        return [r for r in self.audit.read_page(0, 1000) if str(r.get("action")).startswith("response.")]


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    settings = Settings(data_dir=str(tmp_path / "data"))
    ensure_dev_keys(settings)
    token = mint_dev_token(settings, sub="alice", org="acme", scope="chat", ttl_seconds=600)
    engine = FakeEngine(MODEL, reply="patient-4711 reply")
    asgi = create_app(settings, engines={MODEL: engine})
    with TestClient(asgi) as client:
        yield App(client, {"Authorization": f"Bearer {token}"}, engine, services_of(asgi).audit_log)


def test_create_answers_a_spec_response_and_is_audited_without_content(
    app: App,
) -> None:
    client, headers, engine = app.client, app.headers, app.engine
    body = {
        "model": MODEL,
        "input": "secret-prompt diabetes",
        "instructions": "Be kind.",
        "metadata": {"k": "v"},
    }
    response = client.post("/v1/responses", json=body, headers=headers)
    assert response.status_code == 200, response.text
    result = response.json()
    validate("Response", result)
    assert (
        result["object"] == "response"
        and result["id"].startswith("resp_")
        and result["status"] == "completed"
    )
    assert result["output"][0]["content"][0]["text"] == "patient-4711 reply "
    assert (
        result["instructions"] == "Be kind." and result["metadata"] == {"k": "v"} and result["store"] is False
    )
    assert [(m.role, m.content) for m in engine.requests[-1].messages or ()] == [
        ("system", "Be kind."),  # the chat service maps developer to system
        ("user", "secret-prompt diabetes"),
    ]
    usage = result["usage"]
    assert (
        usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
        and usage["output_tokens"] == 3
    )
    [record] = app.records()
    assert record["action"] == "response.create" and record["status"] == 200
    assert (record["prompt_tokens"], record["completion_tokens"]) == (usage["input_tokens"], 3)
    text = app.audit.path.read_text()
    assert "secret-prompt" not in text and "patient-4711" not in text and "Be kind" not in text


def test_stream_through_the_app(app: App) -> None:
    client, headers = app.client, app.headers
    response = client.post(
        "/v1/responses", json={"model": MODEL, "input": "Hi", "stream": True}, headers=headers
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert [e["type"] for e in events] == TEXT_EVENTS  # two words: two deltas
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "patient-4711 reply "
    assert app.records()[0]["completion_tokens"] == 3


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"store": True}, "store"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": 10**6}, "max_output_tokens"),
        ({"input": []}, "input"),
        ({"model": "no-such-model"}, "model"),
    ],
)
def test_refusals_are_400_envelopes(app: App, fields: dict[str, Any], param: str) -> None:
    client, headers, engine = app.client, app.headers, app.engine
    seen = len(engine.requests)
    response = client.post("/v1/responses", json={"model": MODEL, "input": "Hi", **fields}, headers=headers)
    assert response.status_code in (400, 404), response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param or response.status_code == 404
    if param in ("store", "previous_response_id", "background", "conversation"):
        assert "stores no responses" in error["message"]
    if param == "max_output_tokens" and fields["max_output_tokens"]:
        assert "max_output_tokens must be at most" in error["message"]
    assert len(engine.requests) == seen  # refused before any generation


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/responses/resp_1"),
        ("DELETE", "/v1/responses/resp_1"),
        ("POST", "/v1/responses/resp_1/cancel"),
        ("GET", "/v1/responses/resp_1/input_items"),
    ],
)
def test_lookups_of_stored_responses_are_400s(app: App, method: str, path: str) -> None:
    client, headers = app.client, app.headers
    response = client.request(method, path, headers=headers)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "response_id" and "stores no responses" in error["message"]


def test_the_chat_request_type_is_read_for_what_it_can_carry() -> None:
    assert {"model", "messages", "max_completion_tokens", "temperature", "seed"} <= CHAT_FIELDS


def test_closing_the_event_stream_early_closes_the_chat_stream() -> None:
    """A client that goes away mid-answer: the generation behind it is closed (and so aborted)."""
    chat = ChatSSE(chunk({"content": "Par"}), chunk({"content": "is"}), chunk({}, "stop"))

    async def run() -> list[bytes]:
        events = response_events(chat, _in_progress())
        taken = [await anext(events) for _ in range(5)]  # created ... the first delta
        await events.aclose()
        return taken

    taken = asyncio.run(run())
    assert b"response.output_text.delta" in taken[-1] and chat.closed
