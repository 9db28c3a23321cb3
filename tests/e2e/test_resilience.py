"""The gateway survives its parts failing: the engine after a request sequence that once took it down for
good, and the fine-tuning worker `gateway serve` runs after a `kill -9` in the middle of a job."""

from __future__ import annotations

import concurrent.futures
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.harness import Gateway, non_json_lines, running
from tests.e2e.jobs import create_job, events, sdk_client, upload_training_file, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, certs: Path, model_dir: Path) -> Iterator[Gateway]:
    """With the fine-tuning worker that `gateway serve` starts and supervises."""
    data = tmp_path_factory.mktemp("resilience") / "data"
    yield from running(Gateway(data_dir=data, certs=certs, model_dir=model_dir))


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return sdk_client(gateway)


def _chat(gateway: Gateway, token: str, content: str, max_tokens: int) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    with gateway.client(token) as http:
        return http.post("/v1/chat/completions", json=body)


def test_a_long_prompt_then_three_concurrent_requests_leave_the_engine_serving(gateway: Gateway) -> None:
    """The issue's four requests: the long prompt grows the KV cache inside a step; finishing out of slot
    order then compacted it outside inference mode, and every later request was a 503."""
    token = gateway.token()
    first = _chat(gateway, token, "word " * 1500, 4)
    assert first.status_code == 200, first.text
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda n: _chat(gateway, token, "Say something.", n), (5, 40, 60)))
    assert [r.status_code for r in replies] == [200, 200, 200], [r.text for r in replies]
    ready = gateway.client().get("/readyz")
    assert ready.status_code == 200 and ready.json()["engine"] is True
    assert _chat(gateway, token, "Hello", 3).status_code == 200
    assert gateway.metric("gateway_engine_failed_steps_total") == 0


def test_a_worker_killed_mid_job_is_restarted_and_the_job_resumes(
    client: openai.OpenAI, gateway: Gateway
) -> None:
    training_file = upload_training_file(client)
    job = create_job(client, training_file, n_epochs=1, batch_size=8, save_steps=1, learning_rate=5e-4)
    wait_for(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, 600, "a checkpoint")
    pid = gateway.worker_pid()
    assert pid is not None and gateway.client().get("/readyz").json()["worker"] is True
    os.kill(pid, signal.SIGKILL)  # no hand-back: the job is left `running` under a dead worker
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
    wait_for(lambda: gateway.metric("gateway_finetune_worker_restarts_total") >= 1, 60, "a worker restart")
    new_pid = wait_for(lambda: gateway.worker_pid(), 60, "the new worker")
    assert new_pid != pid
    done = wait_for(
        lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j,
        600,
        "the resumed job to finish",
    )
    assert done.status == "succeeded", done.error
    messages = [e.message for e in events(client, job.id)]
    assert any(m.startswith("Resuming fine-tuning job (attempt 2)") for m in messages), messages
    assert gateway.client().get("/readyz").json()["worker"] is True
    assert gateway.metric("gateway_finetune_worker_up") == 1
    logs = gateway.logs()  # the gateway's and its workers' lines, all JSON
    assert "worker.process_exited" in logs and "worker.restarting" in logs
    assert non_json_lines(logs) == []
