"""Fine-tuning helpers the e2e modules share: the demo rows, uploading them, creating a job, waiting."""

from __future__ import annotations

import io
import json
import random
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai

from tests.e2e.harness import Gateway

BASE = "smollm2-135m-instruct"
SCOPES = "models:read chat files:read files:write fine_tuning:read fine_tuning:write"
INSTRUCTION = "分析客户风险等级"
LABELS = ("低风险", "中等风险", "高风险")
# Small, fast and still sticky on 2 CPU cores: short rows, a high learning rate, a fixed seed.  24 steps at
# learning_rate * learning_rate_multiplier = 3e-3 (a multiplier of 2 rather than 1: tests/spec.py reads the
# spec's OpenAPI-3.0 `exclusiveMinimum: true` as "> 1" under JSON Schema 2020-12).  With this seed the adapter
# answers every 高风险 row right and tells the classes apart.
HYPER = {
    "n_epochs": 3,
    "batch_size": 4,
    "learning_rate": 1.5e-3,
    "learning_rate_multiplier": 2.0,
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "max_seq_length": 128,
}
SEED = 1234


def sdk_client(gateway: Gateway, scope: str = SCOPES, *, org: str = "acme") -> openai.OpenAI:
    """The official SDK pointed at `gateway`, trusting its dev CA, with a token for `org`."""
    return openai.OpenAI(
        base_url=gateway.base_url,
        api_key=gateway.token(scope, org=org),
        http_client=httpx.Client(verify=gateway.verify(), timeout=300),
    )


def finance_rows(n: int = 30) -> list[dict[str, str]]:
    """Varied customers; the label follows income and debts, so the three classes look different."""
    rng = random.Random(42)
    rows = []
    for i in range(n):
        label = LABELS[i % 3]
        age = rng.randint(25, 60)
        if label == "低风险":
            detail = f"年收入{rng.randint(60, 120)}万,无负债"
        elif label == "中等风险":
            detail = f"年收入{rng.randint(30, 60)}万,有房贷"
        else:
            detail = f"年收入{rng.randint(5, 20)}万,有多笔逾期贷款"
        rows.append({"instruction": INSTRUCTION, "input": f"客户年龄{age}岁,{detail}", "output": label})
    return rows


def upload_training_file(client: openai.OpenAI, rows: list[dict[str, str]] | None = None) -> str:
    """The rows as an Alpaca JSON array, uploaded with the SDK; returns the file id."""
    data = json.dumps(rows or finance_rows(), ensure_ascii=False).encode()
    uploaded = client.files.create(file=("finance_risk.json", io.BytesIO(data)), purpose="fine-tune")
    return uploaded.id


def create_job(client: openai.OpenAI, training_file: str, **hyper: Any) -> Any:
    return client.fine_tuning.jobs.create(
        model=BASE,
        training_file=training_file,
        seed=SEED,
        suffix="risk",
        method={"type": "supervised", "supervised": {"hyperparameters": {**HYPER, **hyper}}},  # type: ignore[typeddict-unknown-key]
    )


def wait_for(
    check: Callable[[], Any], timeout: float, what: str, logs: Callable[[], str] | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            tail = logs()[-3000:] if logs else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tail}")
        time.sleep(0.2)
    return result


def events(client: openai.OpenAI, job_id: str) -> list[Any]:
    """Oldest first."""
    return list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=1000))))


def finished_job(
    client: openai.OpenAI, job_id: str, timeout: float = 1200, logs: Callable[[], str] | None = None
) -> Any:
    def finished() -> Any:
        current = client.fine_tuning.jobs.retrieve(job_id)
        return current if current.status in ("succeeded", "failed", "cancelled") else None

    return wait_for(finished, timeout, f"job {job_id} to finish", logs)
