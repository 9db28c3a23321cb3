"""A real fine-tune against the real HTTPS gateway and a separate worker process (python -m finetune.worker).

Upload ~30 Alpaca rows of finance-risk labels with curl, fine-tune with the openai SDK, watch the loss fall in
the events, chat with the new model (temperature 0) and get the trained label where the base model does not;
cancel a second job while it trains; SIGKILL the worker during a third and see it resume from a checkpoint
after a restart; run a few QLoRA (NF4) steps on the CPU; with encryption at rest on (a gateway of its own),
find no training text and no readable adapter under the data dir while a job trains and after a SIGTERM
hand-back, then resume from the sealed checkpoint.  Measured numbers are printed (run with -s).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.harness import REPO, Gateway, non_json_lines, running
from tests.e2e.jobs import (
    BASE,
    LABELS,
    SCOPES,
    create_job,
    events,
    finance_rows,
    sdk_client,
    upload_training_file,
    wait_for,
)
from tests.spec import validate

# Generous limits: a shared CI machine can be several times slower than an idle one.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]


class WorkerProcess:
    """`python -m finetune.worker` with the gateway's settings, started and killed by the test."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = gateway.data_dir.parent / "worker.log"

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "finetune.worker"],
            env=self.gateway.env(),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=60)
        self.process = None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, certs: Path, model_dir: Path) -> Iterator[Gateway]:
    data = tmp_path_factory.mktemp("finetune") / "data"
    yield from running(Gateway(data_dir=data, certs=certs, model_dir=model_dir), "--no-worker")


@pytest.fixture(scope="module")
def worker(gateway: Gateway) -> Iterator[WorkerProcess]:
    process = WorkerProcess(gateway)
    process.start()
    yield process
    process.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return sdk_client(gateway)


@pytest.fixture(scope="module")
def training_file(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Uploaded with curl, as an Alpaca JSON array."""
    path = tmp_path_factory.mktemp("upload") / "finance_risk.json"
    path.write_text(json.dumps(finance_rows(), ensure_ascii=False, indent=1), encoding="utf-8")
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--fail-with-body",
            "--cacert",
            gateway.ca,
            "-H",
            f"Authorization: Bearer {gateway.token(SCOPES)}",
            "-F",
            "purpose=fine-tune",
            "-F",
            f"file=@{path}",
            f"{gateway.base_url}/files",
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    body = json.loads(out.stdout)
    validate("OpenAIFile", body)
    assert body["purpose"] == "fine-tune" and body["bytes"] == path.stat().st_size
    return str(body["id"])


def done_steps(log: list[Any]) -> int:
    return max(e.data["step"] for e in log if e.type == "metrics")


def ask(client: openai.OpenAI, model: str, customer: dict[str, str]) -> str:
    reply = client.chat.completions.create(
        model=model,
        temperature=0,
        max_tokens=8,
        messages=[{"role": "user", "content": f"{customer['instruction']}\n{customer['input']}"}],
    )
    return (reply.choices[0].message.content or "").strip()


@dataclass(frozen=True)
class Trained:
    """The module's one full fine-tune, as the first client saw it."""

    created: Any  # the job as the create call returned it
    done: Any  # the job once it succeeded
    first_answer: str  # the first chat with the new model, sent the moment the job read `succeeded`
    hot_load_s: float  # from `succeeded` to that answer
    job_s: float  # from create to `succeeded`


@pytest.fixture(scope="module")
def trained(client: openai.OpenAI, worker: WorkerProcess, training_file: str) -> Trained:
    started = time.monotonic()
    job = create_job(client, training_file)

    def finished() -> Any:
        current = client.fine_tuning.jobs.retrieve(job.id)
        return current if current.status in ("succeeded", "failed", "cancelled") else None

    done = wait_for(finished, 1200, f"job {job.id} to finish", worker.logs)
    seen_done = time.monotonic()
    assert done.status == "succeeded", done.error
    # the first chat after success: the gateway hot-loads the adapter on its own (no restart)
    while True:
        try:
            answer = ask(client, done.fine_tuned_model, finance_rows()[2])
            break
        except openai.NotFoundError:
            assert time.monotonic() - seen_done < 10, "the fine-tuned model never became servable"
            time.sleep(0.05)
    hot_load = time.monotonic() - seen_done
    print(f"\nfine-tune e2e: job {seen_done - started:.1f} s, hot-load {hot_load:.3f} s")
    return Trained(job, done, answer, hot_load, seen_done - started)


def test_fine_tune_then_chat_with_the_new_model(
    client: openai.OpenAI, gateway: Gateway, trained: Trained
) -> None:
    job, done, model = trained.created, trained.done, trained.done.fine_tuned_model
    assert job.status == "validating_files" and job.object == "fine_tuning.job"
    validate("FineTuningJob", job.model_dump(exclude_unset=True))
    assert trained.first_answer == "高风险", trained.first_answer
    assert model == f"ft:{BASE}:acme:risk:{job.id[-8:]}"
    validate("FineTuningJob", done.model_dump(exclude_unset=True))
    assert done.trained_tokens and done.trained_tokens > 0 and done.finished_at and done.result_files
    assert done.estimated_finish is None and done.error is None
    results = client.files.retrieve(done.result_files[0])
    assert results.purpose == "fine-tune-results"
    csv = client.files.content(done.result_files[0]).text.splitlines()
    assert csv[0].startswith("step,train_loss") and len(csv) > 5

    # the loss falls: the last logged steps are far below the first ones
    log = events(client, job.id)
    validate(
        "ListFineTuningJobEventsResponse",
        {"object": "list", "data": [e.model_dump(exclude_unset=True) for e in log], "has_more": False},
    )
    losses = [e.data["train_loss"] for e in log if e.type == "metrics" and "train_loss" in (e.data or {})]
    assert len(losses) >= 8, losses
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    messages = [e.message for e in log]
    assert messages[0] == f"Created fine-tuning job: {job.id}"
    assert "Files validated, moving job to queued state" in messages
    assert messages[-1] == "The job has successfully completed"
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id)
    assert checkpoints.data and checkpoints.data[0].fine_tuned_model_checkpoint.startswith(
        f"{model}:ckpt-step-"
    )
    validate("FineTuningJobCheckpoint", checkpoints.data[0].model_dump(exclude_unset=True))

    # the model is listed for its tenant, owned by it, and hidden from another tenant
    assert any(m.id == model and m.owned_by == "acme" for m in client.models.list())
    other = sdk_client(gateway, org="globex")
    assert model not in [m.id for m in other.models.list()]
    # the base model does not know the labels; the fine-tuned one answers every class with a label and tells
    # at least two of them apart (which two a model this small gets right depends on the seed)
    assert ask(client, BASE, finance_rows()[2]) not in LABELS
    answers = [ask(client, model, row) for row in finance_rows()[:3]]
    assert set(answers) <= set(LABELS) and len(set(answers)) >= 2, answers
    # a checkpoint is servable under its own name
    assert ask(client, checkpoints.data[0].fine_tuned_model_checkpoint, finance_rows()[2]) in LABELS


def test_fine_tuned_and_base_models_share_a_batch(client: openai.OpenAI, trained: Trained) -> None:
    """Concurrent requests for the base model and the adapter answer each as if alone."""
    import concurrent.futures

    model = trained.done.fine_tuned_model
    customer = finance_rows()[2]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ask, client, name, customer) for name in (model, BASE, model, BASE)]
        answers = [f.result() for f in futures]
    alone = [ask(client, model, customer), ask(client, BASE, customer)]
    assert answers == alone * 2


def test_cancel_stops_a_running_job(client: openai.OpenAI, worker: WorkerProcess, training_file: str) -> None:
    job = create_job(client, training_file, n_epochs=50, batch_size=2)
    wait_for(
        lambda: any(e.type == "metrics" for e in events(client, job.id)), 600, "a training step", worker.logs
    )
    asked = time.monotonic()
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    wait_for(
        lambda: "Training stopped; the job was cancelled" in [e.message for e in events(client, job.id)],
        30,
        "training to stop",
        worker.logs,
    )
    print(f"\nfine-tune e2e: cancel to stopped {time.monotonic() - asked:.2f} s")
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)
    final = client.fine_tuning.jobs.retrieve(job.id)
    assert final.status == "cancelled" and final.fine_tuned_model is None
    steps = [e for e in events(client, job.id) if e.type == "metrics"]
    time.sleep(2)
    assert len([e for e in events(client, job.id) if e.type == "metrics"]) == len(steps)  # really stopped


def test_a_killed_worker_resumes_from_its_checkpoint(
    client: openai.OpenAI, worker: WorkerProcess, training_file: str, gateway: Gateway
) -> None:
    job = create_job(client, training_file, n_epochs=1, batch_size=8, save_steps=1, learning_rate=5e-4)
    wait_for(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, 900, "a checkpoint", worker.logs)
    worker.kill(signal.SIGKILL)  # no clean hand-back: the job stays `running` under a dead worker
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
    saved = max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data)
    worker.start()  # same host and slot: it knows its predecessor is dead and takes the job back at once
    done = wait_for(
        lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j,
        900,
        "the resumed job to finish",
        worker.logs,
    )
    assert done.status == "succeeded", done.error
    log = events(client, job.id)
    messages = [e.message for e in log]
    assert any(m.startswith("Resuming fine-tuning job (attempt 2)") for m in messages), messages
    restart = next(i for i, e in enumerate(log) if "resumed from the checkpoint at step" in e.message)
    from_step = log[restart].data["resumed_from_step"]
    assert from_step >= saved
    after = [e.data["step"] for e in log[restart:] if e.type == "metrics"]
    assert after == list(range(from_step + 1, done_steps(log) + 1)), after  # no step trained twice, none lost
    ask(client, done.fine_tuned_model, finance_rows()[2])  # servable at once (4 steps teach it no label yet)
    assert not (gateway.data_dir / "work" / job.id).exists()  # the private work dir is gone


def test_qlora_trains_a_few_steps_on_the_cpu(
    client: openai.OpenAI, worker: WorkerProcess, training_file: str
) -> None:
    job = create_job(client, training_file, quantization_bit=4, n_epochs=50, batch_size=2)
    first = wait_for(
        lambda: (
            [e for e in events(client, job.id) if e.type == "metrics"]
            or (client.fine_tuning.jobs.retrieve(job.id).status == "failed" and ["failed"])
        ),
        900,
        "a QLoRA step",
        worker.logs,
    )
    assert first != ["failed"], client.fine_tuning.jobs.retrieve(job.id).error
    wait_for(
        lambda: len([e for e in events(client, job.id) if e.type == "metrics"]) >= 2,
        900,
        "2 QLoRA steps",
        worker.logs,
    )
    started = next(e for e in events(client, job.id) if e.message.startswith("Fine-tuning started"))
    assert started.data["quantization_bit"] == 4
    client.fine_tuning.jobs.cancel(job.id)
    assert non_json_lines(worker.logs()) == []  # bitsandbytes' hub-kernel warning and the like are quiet


# ── encryption at rest: what the worker writes under the data dir ──────────────────────────────────────────

CANARY = f"ATREST-CANARY-{uuid.uuid4().hex[:12]}"
# a readable safetensors header names its metadata and the LoRA tensors; sealed files show neither
PLAINTEXT_MARKS = [CANARY.encode(), b'"__metadata__"', b"lora_A"]


@pytest.fixture(scope="module")
def sealed_gateway(
    tmp_path_factory: pytest.TempPathFactory, certs: Path, model_dir: Path
) -> Iterator[Gateway]:
    data = tmp_path_factory.mktemp("finetune-sealed") / "data"
    extra = {
        "GATEWAY_PRIVACY__ENCRYPT_AT_REST": "true",
        "GATEWAY_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
    }
    yield from running(
        Gateway(data_dir=data, certs=certs, model_dir=model_dir, extra_env=extra), "--no-worker"
    )


def plaintext_on_disk(data_dir: Path) -> list[tuple[str, bytes]]:
    """(file, mark) for every file under the data dir holding the training text or a readable adapter; base
    models the operator installed (data/models) are no tenant's data and are skipped."""
    found = []
    for path in data_dir.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.relative_to(data_dir).parts[0] != "models":
            try:
                data = path.read_bytes()
            except FileNotFoundError:  # replaced or pruned while we looked
                continue
            found += [(str(path.relative_to(data_dir)), mark) for mark in PLAINTEXT_MARKS if mark in data]
    return found


def test_with_encryption_nothing_the_worker_writes_is_plaintext(sealed_gateway: Gateway) -> None:
    """While a job trains (checkpoints at every step) and after a SIGTERM hand-back, no file under the data
    dir holds the training text or a readable safetensors header; the job then resumes from a sealed one."""
    client = sdk_client(sealed_gateway)
    rows = [{**row, "input": f"{row['input']} {CANARY}"} for row in finance_rows()]
    job = create_job(client, upload_training_file(client, rows), n_epochs=6, batch_size=2, save_steps=1)
    worker = WorkerProcess(sealed_gateway)
    worker.start()
    try:
        wait_for(
            lambda: len(client.fine_tuning.jobs.checkpoints.list(job.id).data) >= 2, 900, "2 checkpoints"
        )
        running_scan = plaintext_on_disk(sealed_gateway.data_dir)
        work = sealed_gateway.data_dir / "work" / job.id
        assert (work / "trainer" / "checkpoints").is_dir()  # the scan saw the trainer's own checkpoints
        worker.kill(signal.SIGTERM)  # hand the job back
        assert client.fine_tuning.jobs.retrieve(job.id).status == "queued"
        kept = [p for p in work.rglob("*") if p.is_file()]
        assert plaintext_on_disk(sealed_gateway.data_dir) == [] and running_scan == []
        assert kept and all(p.read_bytes().startswith(b"PGWENC") for p in kept), kept  # sealed, nothing else
        worker.start()
        resumed = wait_for(
            lambda: next(
                (e for e in events(client, job.id) if "resumed from the checkpoint" in e.message), None
            ),
            900,
            "the job to resume",
            worker.logs,
        )
        assert resumed.data["resumed_from_step"] >= 2
        client.fine_tuning.jobs.cancel(job.id)
        wait_for(lambda: not work.exists(), 60, "the work dir to go", worker.logs)
        assert plaintext_on_disk(sealed_gateway.data_dir) == []
    finally:
        worker.kill(signal.SIGTERM)
