"""The Responses API (POST /v1/responses, stateless) against the real HTTPS gateway: the official openai SDK's
responses.create and responses.stream, curl's raw SSE, the stored-state 400s.  Every body and event is checked
against the vendored spec."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.api.responses.service import CHAT_FIELDS
from tests.e2e.harness import Gateway
from tests.spec import validate

MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"
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
TEXT_OPENING = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
TEXT_CLOSING = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway.base_url,
        api_key=gateway.token(),
        http_client=httpx.Client(verify=gateway.verify(), timeout=120),
    )


def check_event(event: dict[str, Any]) -> None:
    validate(EVENT_SCHEMAS[event["type"]], event)
    validate("ResponseStreamEvent", event)


def check_text_sequence(types: list[str]) -> None:
    """created, in_progress, the message and its part, one or more text deltas, then the closing four."""
    assert types[:4] == TEXT_OPENING and types[-4:] == TEXT_CLOSING, types
    middle = types[4:-4]
    assert middle and set(middle) == {"response.output_text.delta"}, types


def test_create_answers_like_chat_with_the_same_tokens(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=40
    )
    result = client.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=40)
    validate("Response", result.model_dump(exclude_unset=True, by_alias=True))
    assert result.object == "response" and result.id.startswith("resp_") and result.model == MODEL
    assert result.status == "completed" and result.error is None and result.incomplete_details is None
    assert (
        result.model_dump(exclude_unset=True, by_alias=True)["store"] is False
    )  # nothing is kept server-side
    [message] = result.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert result.output_text == chat.choices[0].message.content and "Paris" in result.output_text
    assert result.usage is not None and chat.usage is not None
    assert result.usage.input_tokens == chat.usage.prompt_tokens
    assert result.usage.output_tokens == chat.usage.completion_tokens
    assert result.usage.total_tokens == result.usage.input_tokens + result.usage.output_tokens
    assert result.temperature == 0 and result.max_output_tokens == 40


def test_instructions_and_a_message_list_are_the_chat_conversation(client: openai.OpenAI) -> None:
    history = [
        {"role": "user", "content": [{"type": "input_text", "text": "My name is Ada."}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello Ada!", "annotations": []}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is my name?"}]},
    ]
    result = client.responses.create(
        model=MODEL,
        instructions="You are a helpful assistant.",
        input=history,
        temperature=0,
        max_output_tokens=30,
    )
    validate("Response", result.model_dump(exclude_unset=True, by_alias=True))
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Hello Ada!"},
            {"role": "user", "content": "What is my name?"},
        ],
        temperature=0,
        max_tokens=30,
    )
    assert result.instructions == "You are a helpful assistant."
    assert result.output_text == chat.choices[0].message.content
    assert result.usage is not None and chat.usage is not None
    assert result.usage.input_tokens == chat.usage.prompt_tokens


def test_max_output_tokens_ends_incomplete(client: openai.OpenAI) -> None:
    result = client.responses.create(
        model=MODEL, input="Write a long story about a dragon.", max_output_tokens=16, temperature=0
    )
    validate("Response", result.model_dump(exclude_unset=True, by_alias=True))
    assert result.status == "incomplete"
    assert result.incomplete_details is not None and result.incomplete_details.reason == "max_output_tokens"
    assert result.output[0].status == "incomplete" and result.output_text
    assert result.usage is not None and result.usage.output_tokens == 16


def test_sdk_stream_events_in_order_and_final_text_is_the_deltas(client: openai.OpenAI) -> None:
    whole = client.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=40)
    types, deltas, numbers = [], [], []
    with client.responses.stream(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=40) as stream:
        for event in stream:
            types.append(event.type)
            numbers.append(event.sequence_number)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    check_text_sequence(types)
    assert numbers == list(range(len(types)))
    assert final.output_text == "".join(deltas) == whole.output_text
    assert final.status == "completed" and final.usage is not None
    assert final.usage.output_tokens == whole.usage.output_tokens  # type: ignore[union-attr]
    validate("Response", final.model_dump(exclude_unset=True, by_alias=True, exclude={"output_parsed"}))


def test_raw_sdk_stream_events_match_the_spec(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(
            model=MODEL, input="Count to five.", temperature=0, max_output_tokens=16, stream=True
        )
    )
    for event in events:
        check_event(event.model_dump(exclude_unset=True, by_alias=True))
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1


def test_curl_sse(gateway: Gateway, tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_text(
        json.dumps(
            {"model": MODEL, "input": QUESTION, "temperature": 0, "max_output_tokens": 40, "stream": True}
        )
    )
    result = subprocess.run(
        [
            "curl", "-sSN", "--fail-with-body", "--cacert", gateway.ca,
            "-H", f"Authorization: Bearer {gateway.token()}", "-H", "Content-Type: application/json",
            "-D", str(tmp_path / "headers"), "--data-binary", f"@{body}", f"{gateway.base_url}/responses",
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    assert "content-type: text/event-stream" in (tmp_path / "headers").read_text().lower()
    events = []
    for block in result.stdout.strip().split("\n\n"):
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        check_event(event)
        events.append(event)
    check_text_sequence([e["type"] for e in events])
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    final = events[-1]["response"]
    assert "Paris" in text and final["output"][0]["content"][0]["text"] == text
    assert final["usage"]["output_tokens"] > 0 and events[0]["response"]["status"] == "in_progress"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"store": True}, "store"),
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"background": True}, "background"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x"}]}]},
         "input[0].content[0]"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"max_output_tokens": 10**7}, "max_output_tokens"),
    ],
)  # fmt: skip
def test_refusals_are_400s_that_say_why(client: openai.OpenAI, fields: dict[str, Any], param: str) -> None:
    fields.setdefault("input", "Hi")
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, **fields)
    assert refused.value.status_code == 400 and refused.value.param == param
    validate("ErrorResponse", refused.value.response.json())
    if param in ("store", "previous_response_id", "background"):
        assert "stores no responses" in refused.value.message


def test_stored_response_lookups_are_400s(client: openai.OpenAI) -> None:
    for call in (
        lambda: client.responses.retrieve("resp_123"),
        lambda: client.responses.delete("resp_123"),
        lambda: client.responses.cancel("resp_123"),
        lambda: client.responses.input_items.list("resp_123"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            call()
        assert refused.value.param == "response_id" and "stores no responses" in refused.value.message


def test_scope_and_audit_record_with_token_counts_only(gateway: Gateway, client: openai.OpenAI) -> None:
    denied = openai.OpenAI(
        base_url=gateway.base_url,
        api_key=gateway.token("models:read"),
        http_client=httpx.Client(verify=gateway.verify(), timeout=60),
    )
    with pytest.raises(openai.PermissionDeniedError):
        denied.responses.create(model=MODEL, input="Hi")
    raw = client.responses.with_raw_response.create(
        model=MODEL, input="zebra-canary-7731 says hello", max_output_tokens=16, temperature=0
    )
    result, request_id = raw.parse(), raw.headers["x-request-id"]
    path = gateway.data_dir / "audit" / "audit.jsonl"
    deadline = time.monotonic() + 10
    while True:
        records = [json.loads(line) for line in path.read_bytes().splitlines()]
        mine = [r for r in records if r.get("request_id") == request_id]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    [record] = mine
    assert record["action"] == "response.create" and record["status"] == 200
    assert record["prompt_tokens"] == result.usage.input_tokens  # type: ignore[union-attr]
    assert record["completion_tokens"] == result.usage.output_tokens  # type: ignore[union-attr]
    assert "zebra-canary" not in path.read_text() and "zebra-canary" not in gateway.logs()
    assert result.output_text[:12] not in path.read_text()


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


def test_text_format_json_schema(client: openai.OpenAI) -> None:
    """Structured output goes through the chat service's response_format; where that is missing, the
    request is a 400 naming text.format (never silently ignored)."""
    fmt = {"type": "json_schema", "name": "Place", "schema": SCHEMA, "strict": True}
    if "response_format" not in CHAT_FIELDS:
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model=MODEL, input=QUESTION, text={"format": fmt})  # type: ignore[arg-type]
        assert refused.value.param == "text.format"
        return
    result = client.responses.create(
        model=MODEL,
        input=f"{QUESTION} Answer as JSON.",
        text={"format": fmt},
        max_output_tokens=60,
        temperature=0,  # type: ignore[arg-type]
    )
    validate("Response", result.model_dump(exclude_unset=True, by_alias=True))
    assert result.text.format.type == "json_schema"  # type: ignore[union-attr]
    assert set(json.loads(result.output_text)) == {"city", "country"}


def test_function_tools_and_a_tool_round_trip(client: openai.OpenAI) -> None:
    """Function tools go through the chat service's tools; where those are missing, a 400 naming tools."""
    if "tools" not in CHAT_FIELDS:
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model=MODEL, input="Weather in Paris?", tools=[TOOL])  # type: ignore[list-item]
        assert refused.value.param == "tools"
        return
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    result = client.responses.create(
        model=MODEL,
        input=ask,
        tools=[TOOL],
        tool_choice="required",
        max_output_tokens=60,
        temperature=0,  # type: ignore[arg-type, list-item]
    )
    validate("Response", result.model_dump(exclude_unset=True, by_alias=True))
    calls = [item for item in result.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and "city" in json.loads(calls[0].arguments)
    follow_up = [
        *ask,
        {
            "type": "function_call",
            "call_id": calls[0].call_id,
            "name": "get_weather",
            "arguments": calls[0].arguments,
        },
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 24 degrees."},
    ]
    answer = client.responses.create(
        model=MODEL, input=follow_up, tools=[TOOL], max_output_tokens=40, temperature=0
    )  # type: ignore[arg-type, list-item]
    validate("Response", answer.model_dump(exclude_unset=True, by_alias=True))
    assert answer.status in ("completed", "incomplete") and answer.output
