"""The official openai SDK against the real HTTPS gateway: chat, streaming, n, stop, seed, usage, logprobs."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from contracts.base_models import load_tokenizer
from tests.e2e.harness import Gateway
from tests.spec import validate

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway.base_url,
        api_key=gateway.token(),
        http_client=httpx.Client(verify=gateway.verify(), timeout=120),
    )


@pytest.fixture(scope="module")
def async_client(gateway: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=gateway.base_url,
        api_key=gateway.token(),
        http_client=httpx.AsyncClient(verify=gateway.verify(), timeout=120),
    )


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert MODEL in [m.id for m in models.data]
    validate("ListModelsResponse", models.model_dump())
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    validate("Model", model.model_dump())


def test_chat_greedy_answers_with_real_usage(client: openai.OpenAI, model_dir) -> None:  # type: ignore[no-untyped-def]
    result = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=40)
    validate("CreateChatCompletionResponse", result.model_dump(exclude_unset=True))
    choice = result.choices[0]
    assert result.object == "chat.completion" and result.model == MODEL
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)["input_ids"]
    assert result.usage is not None
    assert result.usage.prompt_tokens == len(prompt_ids)
    # the completion counts every generated token, the end-of-turn token included
    content_ids = tokenizer(choice.message.content, add_special_tokens=False)["input_ids"]
    assert result.usage.completion_tokens in (len(content_ids), len(content_ids) + 1)
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_max_tokens_stops_with_length(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_completion_tokens=5,
        temperature=0,
    )
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 5


def test_stop_string_is_never_included(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=40)
    assert "Paris" in (plain.choices[0].message.content or "")
    result = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=40, stop=["Paris", "never-there"]
    )
    content = result.choices[0].message.content or ""
    assert "Paris" not in content
    assert (plain.choices[0].message.content or "").startswith(content)
    assert result.choices[0].finish_reason == "stop"


def test_seed_reproducible_and_n_choices(client: openai.OpenAI) -> None:
    def ask(seed: int) -> list[str]:
        result = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me a fun fact."}],
            temperature=1.0,
            top_p=0.95,
            seed=seed,
            max_tokens=24,
            n=2,
        )
        assert [c.index for c in result.choices] == [0, 1]
        return [c.message.content or "" for c in result.choices]

    first, again, other = ask(1234), ask(1234), ask(99)
    assert first == again
    assert first != other
    assert first[0] != first[1]  # the two choices draw from their own streams


def test_penalties_and_developer_role_and_text_parts(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
        ],
        presence_penalty=1.0,
        frequency_penalty=0.5,
        max_tokens=10,
        temperature=0.7,
        user="someone",
        extra_body={"parallel_tool_calls": False, "some_future_field": {"x": 1}},
    )
    assert result.choices[0].message.content


def test_logprobs(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3
    )
    validate("CreateChatCompletionResponse", result.model_dump(exclude_unset=True))
    content = result.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and len(content) == result.usage.completion_tokens  # type: ignore[union-attr]
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.logprob - 1e-4  # greedy picks the top token


def test_stream_chunks_follow_openai(gateway: Gateway) -> None:
    body = {
        "model": MODEL,
        "messages": QUESTION,
        "temperature": 0,
        "max_tokens": 30,
        "stream": True,
        "stream_options": {"include_usage": True},
        "n": 2,
    }
    with (
        gateway.client(gateway.token()) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    for index in (0, 1):
        mine = [c for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert mine[0]["choices"][0]["delta"]["role"] == "assistant"
        assert mine[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert all(c["choices"][0]["finish_reason"] is None for c in mine[:-1])
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in mine)
        assert "Paris" in text
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])


def test_sdk_stream_matches_non_stream(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=30)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == full.choices[0].message.content
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens  # type: ignore[union-attr]


def test_async_client_concurrent_streams(async_client: openai.AsyncOpenAI) -> None:
    async def one(i: int) -> str:
        stream = await async_client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Count from {i} to {i + 5}."}],
            temperature=0,
            max_tokens=24,
            stream=True,
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(4)))

    texts = asyncio.run(main())
    assert all(texts)


def test_legacy_completions(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    validate("CreateCompletionResponse", result.model_dump(exclude_unset=True))
    assert result.object == "text_completion" and result.choices[0].text
    assert result.usage is not None and result.usage.completion_tokens <= 8
    chunks = list(
        client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=6, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices)


def test_legacy_completions_with_a_list_of_prompts(client: openai.OpenAI) -> None:
    prompts = ["The capital of France is", "1, 2, 3,"]
    result = client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=6, temperature=0, n=2, echo=True
    )
    validate("CreateCompletionResponse", result.model_dump(exclude_unset=True))
    assert [c.index for c in result.choices] == [0, 1, 2, 3]  # choice i * n + j: prompt i, completion j
    for choice in result.choices:
        assert choice.text.startswith(prompts[choice.index // 2])
    assert result.usage is not None and result.usage.completion_tokens <= 4 * 6
    chunks = list(
        client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, stream=True)
    )
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt=["x"] * 33, max_tokens=1)
    assert refused.value.status_code == 400 and refused.value.param == "prompt"


def test_legacy_completions_stream_logprobs_and_echo(client: openai.OpenAI) -> None:
    prompt = "1, 2, 3,"
    whole = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2, echo=True
    )
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2, echo=True, stream=True
        )
    )
    for c in chunks:  # the spec has no legacy chunk schema; OpenAI streams finish_reason null until the end
        if c.choices and c.choices[0].finish_reason:
            validate("CreateCompletionResponse", c.model_dump(exclude_unset=True))
    streamed = [c.choices[0] for c in chunks if c.choices]
    assert "".join(s.text for s in streamed) == whole.choices[0].text
    assert whole.choices[0].text.startswith(prompt)
    tokens = [t for s in streamed if s.logprobs for t in s.logprobs.tokens]
    offsets = [o for s in streamed if s.logprobs for o in s.logprobs.text_offset]
    assert whole.choices[0].logprobs is not None
    assert tokens == whole.choices[0].logprobs.tokens
    assert offsets == whole.choices[0].logprobs.text_offset  # the same positions in the echoed text
    assert offsets[0] == len(prompt)
