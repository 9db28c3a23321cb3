"""Agents on the real HTTPS gateway and the default model: structured output by constrained decoding
(the SDK's .parse(), LangChain's with_structured_output), tool calls (required, named, streamed, legacy
functions), LangChain bind_tools and an agent loop that runs a real Python tool.  Every body and chunk is
validated against the vendored spec."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

import httpx
import openai
import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.e2e.harness import Gateway
from tests.spec import validate

MODEL = "smollm2-135m-instruct"


class Color(StrEnum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    street: str = Field(max_length=30)
    city: str = Field(max_length=20)


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int
    favourite_color: Color
    nickname: str | None = Field(max_length=12)
    hobbies: list[str] = Field(min_length=1, max_length=3)
    address: Address


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}}},
    },
}


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway.base_url,
        api_key=gateway.token(),
        http_client=httpx.Client(verify=gateway.verify(), timeout=180),
    )


def _chat_model(gateway: Gateway, **kw: Any) -> ChatOpenAI:
    return ChatOpenAI(
        model=MODEL,
        base_url=gateway.base_url,
        api_key=gateway.token(),  # type: ignore[arg-type]
        http_client=httpx.Client(verify=gateway.verify(), timeout=180),
        **{"temperature": 0, "max_tokens": 200, **kw},
    )


def test_sdk_parse_with_a_nested_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a person called Ada who lives in London."}],
        response_format=Person,
        temperature=0,
        max_tokens=300,
    )
    body = completion.model_dump(exclude_unset=True, mode="json")
    for item in body["choices"]:
        item["message"].pop("parsed", None)  # the SDK's own fields, not on the wire
        if item["message"].get("tool_calls") is None:
            item["message"].pop("tool_calls", None)
    validate("CreateChatCompletionResponse", body)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    person = choice.message.parsed
    assert isinstance(person, Person) and isinstance(person.address, Address)
    assert 1 <= len(person.hobbies) <= 3 and person.favourite_color in set(Color)


def test_json_object_and_text_formats(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give me a JSON object about a cat."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=120,
    )
    validate("CreateChatCompletionResponse", result.model_dump(exclude_unset=True))
    if result.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(result.choices[0].message.content or ""), dict)
    else:
        assert (result.choices[0].message.content or "").startswith("{")
    text = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        response_format={"type": "text"},
        temperature=0,
        max_tokens=30,
    )
    assert "Paris" in (text.choices[0].message.content or "")


def test_a_budget_that_runs_out_is_length(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a person."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "p", "schema": Person.model_json_schema()},
        },
        temperature=0,
        max_tokens=6,
    )
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 6


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "bogus"}}},
        {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"$ref": "#/$defs/Missing"}}},
        {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"not": {"type": "string"}}}},
    ],
)
def test_a_schema_that_cannot_be_enforced_is_a_400(gateway: Gateway, response_format: dict[str, Any]) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": response_format,
    }
    with gateway.client(gateway.token()) as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "response_format" and error["type"] == "invalid_request_error"
    validate("ErrorResponse", response.json())


def test_required_tool_call_matches_the_parameters(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=120,
    )
    validate("CreateChatCompletionResponse", result.model_dump(exclude_unset=True))
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].id.startswith("call_") and calls[0].type == "function"
    arguments = json.loads(calls[0].function.arguments)
    if calls[0].function.name == "get_weather":
        assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")
    else:
        assert calls[0].function.name == "get_time" and set(arguments) <= {"zone"}


def test_named_tool_call_streams_id_name_then_arguments(gateway: Gateway) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the weather in Rome?"}],
        "tools": [WEATHER, TIME],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "temperature": 0,
        "max_tokens": 120,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = []
    with (
        gateway.client(gateway.token()) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    pieces = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks
        if c["choices"] and "tool_calls" in c["choices"][0]["delta"]
    ]
    assert len(pieces) > 2  # the arguments came in pieces
    first = pieces[0]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"]["name"] == "get_weather"
    assert all("id" not in piece and "name" not in piece["function"] for piece in pieces[1:])
    arguments = json.loads("".join(piece["function"]["arguments"] for piece in pieces))
    assert set(arguments) == {"city", "unit"}
    finishes = [
        c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]
    ]
    assert finishes == ["tool_calls"] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_sdk_stream_accumulates_tool_calls(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,  # greedy, a small model repeats its call until the budget ends
        temperature=0,
        max_tokens=150,
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert calls and all(c.function.name == "get_weather" for c in calls)
    assert all(set(json.loads(c.function.arguments)) == {"city", "unit"} for c in calls)
    assert final.choices[0].finish_reason == "tool_calls"


def test_history_with_tool_calls_and_tool_results_is_accepted(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": '{"city": "Paris", "unit": "celsius"}',
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 degrees celsius."},
        ],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        temperature=0,
        max_tokens=40,
    )
    validate("CreateChatCompletionResponse", result.model_dump(exclude_unset=True))
    assert result.choices[0].finish_reason in ("stop", "length") and result.choices[0].message.content


def test_legacy_functions_answer_with_function_call(gateway: Gateway) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "functions": [WEATHER["function"]],
        "function_call": {"name": "get_weather"},
        "temperature": 0,
        "max_tokens": 120,
    }
    with gateway.client(gateway.token()) as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    validate("CreateChatCompletionResponse", response.json())
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "function_call" and "tool_calls" not in choice["message"]
    call = choice["message"]["function_call"]
    assert call["name"] == "get_weather" and set(json.loads(call["arguments"])) == {"city", "unit"}


def test_bad_tool_requests_are_400(gateway: Gateway) -> None:
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
          "tool_choice": "required"}, "tools"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ]  # fmt: skip
    with gateway.client(gateway.token()) as http:
        for extra, param in cases:
            response = http.post("/v1/chat/completions", json={**base, **extra})
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == param
            validate("ErrorResponse", response.json())


def test_langchain_with_structured_output(gateway: Gateway) -> None:
    structured = _chat_model(gateway, max_tokens=300).with_structured_output(Person)  # json_schema by default
    person = structured.invoke("Describe a person called Grace who lives in New York.")
    assert isinstance(person, Person) and 1 <= len(person.hobbies) <= 3


def test_langchain_bind_tools_any_and_an_agent_loop(gateway: Gateway) -> None:
    calls_made: list[int] = []

    @tool
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        calls_made.append(a * b)
        return a * b

    llm = _chat_model(gateway)
    forced = llm.bind_tools([multiply], tool_choice="any", parallel_tool_calls=False)
    question = HumanMessage("What is 6 times 7? Use the multiply tool.")
    first = forced.invoke([question])
    assert first.tool_calls and first.tool_calls[0]["name"] == "multiply"
    assert set(first.tool_calls[0]["args"]) == {"a", "b"}
    # the loop: run the real tool, hand its result back, and let the model answer from it
    history: list[Any] = [question]
    reply, agent = first, llm.bind_tools([multiply])  # then tool_choice auto: answer or call again
    for _ in range(3):
        if not reply.tool_calls:
            break
        history.append(reply)
        for call in reply.tool_calls:
            history.append(ToolMessage(content=str(multiply.invoke(call["args"])), tool_call_id=call["id"]))
        reply = agent.invoke(history)
    answer = reply if not reply.tool_calls else llm.bind_tools([multiply], tool_choice="none").invoke(history)
    assert calls_made and not answer.tool_calls
    assert isinstance(answer.content, str) and answer.content.strip()
    assert answer.usage_metadata and answer.usage_metadata["input_tokens"] > 0
