"""`kill -9` at random moments: the fine-tuning worker mid-training, and the gateway mid-request.

Worker: kills are spread over jobs, at most MAX_ATTEMPTS - 1 per job (the worker fails a job interrupted
more often than that, on purpose: a job that kills its worker must not loop forever).  Each kill lands a
random fraction of a second after the current attempt's training began; every job must end `succeeded`,
resume from at least the newest checkpoint listed before the kill, lose at most one checkpoint interval, and
its adapter and a checkpoint must answer a chat.

Gateway: requests of every kind are in flight (streams, uploads, lists) when the gateway is killed; after the
restart `gateway audit verify` passes, every file whose upload was answered 200 is there with the same bytes,
and every job is still there with its status.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai

from finetune.worker import MAX_ATTEMPTS
from tests.e2e.harness import REPO, Gateway
from tests.e2e.jobs import create_job, events, finance_rows, finished_job, upload_training_file, wait_for

__all__ = [
    "GatewayKills",
    "WorkerKills",
    "audit_verify",
    "kill_gateway_mid_request",
    "kill_worker_mid_training",
]

MODEL = "smollm2-135m-instruct"
SAVE_STEPS = 1
_COUNT_LOCK = threading.Lock()


@dataclass
class WorkerKills:
    kills: int = 0  # kills that landed while a job was running
    idle_kills: int = 0  # kills that found the job finished a moment before (not counted in `kills`)
    jobs: list[str] = field(default_factory=list)
    lost_steps: list[int] = field(default_factory=list)  # per kill: steps trained and not checkpointed
    failures: list[str] = field(default_factory=list)


def _started_events(client: openai.OpenAI, job_id: str) -> list[Any]:
    return [e for e in events(client, job_id) if e.message.startswith("Fine-tuning started")]


def _last_step(client: openai.OpenAI, job_id: str) -> int:
    steps = [int(e.data["step"]) for e in events(client, job_id) if e.type == "metrics" and e.data]
    return max(steps, default=0)


def _total_steps(client: openai.OpenAI, job_id: str) -> int:
    totals = [
        int(e.data.get("total_steps") or 0) for e in events(client, job_id) if e.type == "metrics" and e.data
    ]
    return max(totals, default=0)


def _newest_checkpoint(client: openai.OpenAI, job_id: str) -> int:
    listed = client.fine_tuning.jobs.checkpoints.list(job_id).data
    return max((c.step_number for c in listed), default=0)


def kill_worker_mid_training(
    gateway: Gateway, client: openai.OpenAI, kills: int, rng: random.Random
) -> WorkerKills:
    report = WorkerKills()
    training_file = upload_training_file(client)
    while report.kills < kills:
        job = create_job(client, training_file, n_epochs=3, batch_size=4, save_steps=SAVE_STEPS)  # 24 steps
        report.jobs.append(job.id)
        per_job = min(MAX_ATTEMPTS - 1, kills - report.kills)
        planned: list[tuple[int, int]] = []  # (newest checkpoint, last step) when each kill landed
        for attempt in range(1, per_job + 1):
            wait_for(
                lambda a=attempt, j=job.id: (
                    len(_started_events(client, j)) >= a
                    or client.fine_tuning.jobs.retrieve(j).status != "running"
                ),
                600,
                f"attempt {attempt} of {job.id} to start training",
                gateway.logs,
            )
            time.sleep(rng.uniform(0.0, 1.5))  # a random moment of this attempt's training
            checkpoint, step = _newest_checkpoint(client, job.id), _last_step(client, job.id)
            pid = gateway.worker_pid()
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            if client.fine_tuning.jobs.retrieve(job.id).status != "running":  # it finished just before
                report.idle_kills += 1
                wait_for(
                    lambda p=pid: (n := gateway.worker_pid()) is not None and n != p, 120, "a new worker"
                )
                break  # the remaining kills go to the next job
            report.kills += 1
            planned.append((checkpoint, step))
            wait_for(lambda p=pid: (n := gateway.worker_pid()) is not None and n != p, 120, "a new worker")
        done = finished_job(client, job.id, logs=gateway.logs)
        if done.status != "succeeded":
            report.failures.append(f"{job.id} ended {done.status}: {done.error}")
            continue
        resumed = [int((e.data or {}).get("resumed_from_step", 0)) for e in _started_events(client, job.id)]
        for (checkpoint, step), start in zip(planned, resumed[1:], strict=False):
            if start < checkpoint:
                report.failures.append(f"{job.id} resumed at step {start}, before checkpoint {checkpoint}")
            report.lost_steps.append(max(0, step - start))
        # A kill after the last step (while the adapter is published) resumes nothing to train: the job
        # finishes from its checkpoints without a new start; every kill before it must restart training.
        total = _total_steps(client, job.id)
        mid_training = sum(1 for _, step in planned if not total or step < total)
        # a kill before training began (the model still loading) resumes too, but says "Resuming" only
        restarts = [e for e in events(client, job.id) if e.message.startswith("Resuming fine-tuning job")]
        if not mid_training <= len(restarts) <= len(planned):
            story = [e.message[:60] for e in events(client, job.id) if e.type != "metrics"]
            report.failures.append(
                f"{job.id}: {len(planned)} kills (steps {[s for _, s in planned]} of {total}) but "
                f"{len(restarts)} resumptions; events {story}"
            )
        newest = client.fine_tuning.jobs.checkpoints.list(job.id).data[0].fine_tuned_model_checkpoint
        for model in (done.fine_tuned_model, newest):  # the adapters load and answer: nothing corrupt
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "分析客户风险等级"}], max_tokens=4
            )
            if not reply.choices[0].message.content:
                report.failures.append(f"{model} answered nothing")
    return report


def audit_verify(gateway: Gateway) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "audit", "verify"],
        env=gateway.env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@dataclass
class GatewayKills:
    kills: int = 0
    requests_in_flight: int = 0  # requests started before a kill (answered or cut off by it)
    files_kept: int = 0
    bytes_checked: int = 0
    bytes_lost: int = 0
    failures: list[str] = field(default_factory=list)


def _traffic(
    gateway: Gateway,
    token: str,
    stop: threading.Event,
    uploaded: dict[str, tuple[str, int]],
    counts: list[int],
) -> None:
    """Chats (streamed and not), uploads and lists in a loop until `stop`; records answered uploads."""
    rng = random.Random(threading.get_ident())
    try:
        with gateway.client(token) as http:
            while not stop.is_set():
                with _COUNT_LOCK:
                    counts[0] += 1
                kind = rng.choice(["stream", "chat", "upload", "list"])
                if kind == "upload":
                    data = io.BytesIO(("\n".join(_rows(rng))).encode())
                    response = http.post(
                        "/v1/files", files={"file": ("t.jsonl", data)}, data={"purpose": "fine-tune"}
                    )
                    if response.status_code == 200:
                        body = data.getvalue()
                        uploaded[response.json()["id"]] = (hashlib.sha256(body).hexdigest(), len(body))
                elif kind == "list":
                    http.get("/v1/fine_tuning/jobs")
                else:
                    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 24}
                    if kind == "stream":
                        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                            for _ in r.iter_lines():
                                pass
                    else:
                        http.post("/v1/chat/completions", json=body)
    except (httpx.HTTPError, OSError):
        return  # the gateway died under us: that is the point


def _rows(rng: random.Random) -> list[str]:
    rows = finance_rows(rng.randint(3, 12))
    return [json.dumps(r, ensure_ascii=False) for r in rows]


def kill_gateway_mid_request(
    gateway: Gateway, client_factory: Any, token: str, kills: int, rng: random.Random
) -> GatewayKills:
    report = GatewayKills()
    uploaded: dict[
        str, tuple[str, int]
    ] = {}  # file id -> (sha256, size) of what was sent, for uploads answered 200
    for _ in range(kills):
        before_jobs = {j.id: j.status for j in client_factory().fine_tuning.jobs.list(limit=100)}
        stop, counts = threading.Event(), [0]
        threads = [
            threading.Thread(target=_traffic, args=(gateway, token, stop, uploaded, counts)) for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        time.sleep(rng.uniform(0.5, 3.0))
        gateway.stop(signal.SIGKILL)
        report.kills += 1
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        report.requests_in_flight += counts[0]
        gateway.start()
        verdict = audit_verify(gateway)
        if verdict.returncode != 0:
            report.failures.append(
                f"audit verify after kill {report.kills}: {verdict.stdout} {verdict.stderr}"
            )
        client = client_factory()
        after_jobs = {j.id: j.status for j in client.fine_tuning.jobs.list(limit=100)}
        for job_id, status in before_jobs.items():
            if job_id not in after_jobs:
                report.failures.append(f"job {job_id} lost")
            elif status in ("succeeded", "failed", "cancelled") and after_jobs[job_id] != status:
                report.failures.append(f"job {job_id} was {status}, now {after_jobs[job_id]}")
    with gateway.client(token) as http:
        for file_id, (digest, size) in uploaded.items():
            response = http.get(f"/v1/files/{file_id}/content")
            if response.status_code != 200 or hashlib.sha256(response.content).hexdigest() != digest:
                report.failures.append(f"file {file_id}: {response.status_code}")
                report.bytes_lost += size
                continue
            report.files_kept += 1
            report.bytes_checked += len(response.content)
    return report
