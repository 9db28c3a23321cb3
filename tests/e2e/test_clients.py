"""LangChain and curl, unchanged, against the real HTTPS gateway."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import httpx
import pytest
from langchain_openai import ChatOpenAI, OpenAI

from tests.e2e.harness import Gateway
from tests.spec import validate

MODEL = "smollm2-135m-instruct"


def _pointed_at(gateway: Gateway, max_tokens: int) -> dict[str, Any]:
    """What any LangChain OpenAI class needs to talk to the gateway: its URL, a token, our dev CA."""
    return {
        "model": MODEL,
        "base_url": gateway.base_url,
        "api_key": gateway.token(),
        "temperature": 0,
        "max_tokens": max_tokens,
        "http_client": httpx.Client(verify=gateway.verify(), timeout=120),
        "http_async_client": httpx.AsyncClient(verify=gateway.verify(), timeout=120),
    }


@pytest.fixture(scope="module")
def llm(gateway: Gateway) -> ChatOpenAI:
    return ChatOpenAI(**_pointed_at(gateway, max_tokens=24))


def test_langchain_invoke(llm: ChatOpenAI) -> None:
    message = llm.invoke("What is the capital of France?")
    assert "Paris" in str(message.content)
    assert message.usage_metadata and message.usage_metadata["output_tokens"] > 0


def test_langchain_stream(llm: ChatOpenAI) -> None:
    parts = [chunk.content for chunk in llm.stream("What is the capital of France?")]
    assert len(parts) > 2 and "Paris" in "".join(str(p) for p in parts)


def test_langchain_batch(llm: ChatOpenAI) -> None:
    answers = llm.batch(["Say hello.", "Name a fruit.", "What is 2 + 2?"])
    assert len(answers) == 3 and all(a.content for a in answers)


def test_langchain_completion_llm_sends_its_prompts_in_one_request(gateway: Gateway) -> None:
    # LangChain's completion LLM batches prompts into one /v1/completions request with a list of prompts
    llm = OpenAI(**_pointed_at(gateway, max_tokens=8))
    prompts = ["The capital of France is", "1, 2, 3,", "Water is made of"]
    result = llm.generate(prompts)
    texts = [g[0].text for g in result.generations]
    assert len(texts) == 3 and all(texts)
    alone = [llm.invoke(p) for p in prompts]  # each on its own gives the same greedy answer
    assert sum(a == t for a, t in zip(alone, texts, strict=True)) >= 2  # batching may flip a near-tie
    assert result.llm_output and result.llm_output["token_usage"]["completion_tokens"] > 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_chat_and_stream(gateway: Gateway) -> None:
    token = gateway.token()
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 12})
    common = [
        "curl",
        "-sS",
        "--cacert",
        gateway.ca,
        "-H",
        f"Authorization: Bearer {token}",
        "-H",
        "Content-Type: application/json",
    ]
    plain = subprocess.run(
        [*common, "-d", body, f"{gateway.base_url}/chat/completions"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result = json.loads(plain.stdout)
    validate("CreateChatCompletionResponse", result)
    assert result["choices"][0]["message"]["content"]

    stream_body = json.dumps({**json.loads(body), "stream": True})
    streamed = subprocess.run(
        [*common, "-N", "-d", stream_body, f"{gateway.base_url}/chat/completions"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    lines = [line for line in streamed.stdout.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3

    insecure = subprocess.run(
        ["curl", "-sS", f"{gateway.url}/healthz"], capture_output=True, text=True, timeout=30
    )
    assert (
        insecure.returncode != 0
    )  # a self-signed CA the system does not trust: curl refuses without --cacert
