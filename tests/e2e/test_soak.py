"""A soak of mixed traffic against the real server: every kind of request the API takes, concurrently and in a
random order, and not one 5xx.

Prompts from a few tokens to the edge of the context (and a few past it), n > 1, stop sequences, logprobs,
the base model beside a fine-tuned adapter and one of its checkpoints, chat and legacy completions, streams
read to the end and streams the client walks away from.  The seed is in the test id (`test_mixed_traffic
[seed=N]`); replay a failure with `SOAK_SEED=N`, and run longer with `SOAK_REQUESTS=5000`.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.harness import Gateway, running
from tests.e2e.jobs import create_job, finished_job, sdk_client, upload_training_file
from tests.spec import validate

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]

MODEL = "smollm2-135m-instruct"
MAX_MODEL_LEN = 1024  # small enough that edge-of-context prompts stay cheap; the KV cache still grows 4x
CHAT_OVERHEAD = 31  # tokens the chat template adds around one user message (each "word " is one token)
SEED = int(os.environ.get("SOAK_SEED", "20261202"))
REQUESTS = int(os.environ.get("SOAK_REQUESTS", "200"))
CLIENTS = 12
WORDS = [
    "the",
    "a",
    "bank",
    "loan",
    "risk",
    "patient",
    "record",
    "policy",
    "note",
    "claim",
    "rate",
    "fund",
    "clinic",
    "audit",
    "term",
]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, certs: Path, model_dir: Path) -> Iterator[Gateway]:
    data = tmp_path_factory.mktemp("soak") / "data"
    soak = Gateway(
        data_dir=data,
        certs=certs,
        model_dir=model_dir,
        extra_env={
            "GATEWAY_MODELS__MAX_MODEL_LEN": str(MAX_MODEL_LEN),
            "GATEWAY_LIMITS__REQUESTS_PER_MINUTE": "100000",
        },
    )
    yield from running(soak)  # with the fine-tuning worker, for the adapter


@pytest.fixture(scope="module")
def adapters(gateway: Gateway) -> list[str]:
    """A real (short) fine-tune: its model and one of its checkpoints."""
    client = sdk_client(gateway)
    job = create_job(client, upload_training_file(client), n_epochs=1, batch_size=8, save_steps=2)
    done = finished_job(client, job.id, logs=gateway.logs)
    assert done.status == "succeeded", done.error
    checkpoint = client.fine_tuning.jobs.checkpoints.list(job.id).data[0].fine_tuned_model_checkpoint
    return [done.fine_tuned_model, checkpoint]


@dataclass
class Outcome:
    status: int
    kind: str
    detail: str = ""


def _plan(rng: random.Random, models: list[str]) -> dict[str, Any]:
    """One request: where it goes, its body, and whether (and when) the client walks away from its stream."""
    size = rng.choices(["short", "medium", "edge", "over"], weights=[60, 28, 8, 4])[0]
    max_tokens = rng.randint(1, 24)
    if size == "short":
        text = " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))
    elif size == "medium":
        text = " ".join(rng.choices(WORDS, k=rng.randint(40, 200)))
    else:  # "word " is one token each: place the prompt exactly at (or past) the edge of the context
        max_tokens = rng.randint(1, 16)
        room = MAX_MODEL_LEN - CHAT_OVERHEAD - max_tokens
        text = "word " * (room - rng.randint(0, 40) if size == "edge" else room + rng.randint(1, 200))
    body: dict[str, Any] = {
        "model": rng.choices([MODEL, *models], weights=[6, 3, 1])[0],
        "max_tokens": max_tokens,
        "n": rng.choices([1, 2, 3], weights=[7, 2, 1])[0],
        "stream": rng.random() < 0.5,
    }
    if rng.random() < 0.5:
        body.update(temperature=round(rng.uniform(0.3, 1.2), 2), seed=rng.randint(0, 2**31))
    else:
        body["temperature"] = 0
    if rng.random() < 0.2:
        body["stop"] = rng.choice([["."], ["\n", "risk"], "the"])
    chat = rng.random() < 0.8
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
        if rng.random() < 0.2:
            body.update(logprobs=True, top_logprobs=rng.randint(0, 3))
    else:
        body["prompt"] = text
        if rng.random() < 0.2:
            body["logprobs"] = rng.randint(0, 3)
    walk_away = rng.randint(1, 4) if body["stream"] and rng.random() < 0.3 else None
    return {
        "path": "/v1/chat/completions" if chat else "/v1/completions",
        "body": body,
        "walk_away": walk_away,
        "kind": f"{'chat' if chat else 'completion'}/{size}",
    }


def _send(http: httpx.Client, plan: dict[str, Any]) -> Outcome:
    path, body, kind = plan["path"], plan["body"], plan["kind"]
    if not body["stream"]:
        response = http.post(path, json=body)
        if response.status_code == 200:
            schema = "CreateChatCompletionResponse" if "chat" in path else "CreateCompletionResponse"
            validate(schema, response.json())
        return Outcome(response.status_code, kind, response.text[:300])
    with http.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            response.read()
            return Outcome(response.status_code, kind, response.text[:300])
        chunks = 0
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:  # an error after the 200 went out is a failure too
                return Outcome(500, kind, line[:300])
            chunks += 1
            if plan["walk_away"] is not None and chunks >= plan["walk_away"]:
                return Outcome(200, kind + "/walked-away")
    return Outcome(200, kind)


@pytest.mark.parametrize("seed", [SEED], ids=lambda s: f"seed={s}")
def test_mixed_traffic(gateway: Gateway, adapters: list[str], seed: int) -> None:
    rng = random.Random(seed)
    plans = [_plan(rng, adapters) for _ in range(REQUESTS)]
    token = gateway.token()

    def run(batch: list[dict[str, Any]]) -> list[Outcome]:
        with gateway.client(token) as http:
            return [_send(http, plan) for plan in batch]

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        shares = [plans[i::CLIENTS] for i in range(CLIENTS)]
        outcomes = [o for share in pool.map(run, shares) for o in share]
    seconds = time.monotonic() - started
    statuses = Counter(o.status for o in outcomes)
    print(f"\nsoak seed={seed}: {len(outcomes)} requests in {seconds:.0f} s, statuses {dict(statuses)}")

    server_errors = [o for o in outcomes if o.status >= 500]
    assert not server_errors, f"seed={seed}: {server_errors[:5]}"
    assert set(statuses) <= {200, 400}, f"seed={seed}: {statuses}"
    rejected = [o for o in outcomes if o.status == 400]
    assert all("/over" in o.kind and "context_length_exceeded" in o.detail for o in rejected), rejected[:3]
    assert statuses[200] >= 0.9 * len(outcomes)

    ready = gateway.client().get("/readyz")
    assert ready.status_code == 200 and ready.json()["engine"] is True
    deadline = time.monotonic() + 10  # streams the clients walked away from free their slots
    while gateway.metric("gateway_engine_running_sequences") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gateway.metric("gateway_engine_running_sequences") == 0
    assert gateway.metric("gateway_engine_failed_steps_total") == 0
    assert gateway.metric("gateway_engine_restarts_total") == 0
