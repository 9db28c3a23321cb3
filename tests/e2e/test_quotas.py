"""Quotas, floods and fail-closed audit against the real HTTPS server, with the official openai SDK and curl.

One gateway with small quotas (2 files, 1 waiting job, a few tokens a minute, 5 unauthenticated requests a
minute per address) whose audit log lives on its own 1 MiB tmpfs: filling that filesystem makes every audit
append fail with ENOSPC (a real full disk), and freeing it must bring the service back by itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.harness import REPO, Gateway, running
from tests.e2e.jobs import finance_rows
from tests.spec import validate

MODEL = "smollm2-135m-instruct"
TOKENS_PER_MINUTE = 60


def _mount_tmpfs(where: Path) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(where)], capture_output=True
    )
    return done.returncode == 0


@pytest.fixture(scope="module")
def audit_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    where = tmp_path_factory.mktemp("auditfs") / "mnt"
    if not _mount_tmpfs(where):
        pytest.skip("mounting a size-limited tmpfs is not permitted here (needs root / CAP_SYS_ADMIN)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, certs: Path, model_dir: Path, audit_fs: Path
) -> Iterator[Gateway]:
    data = tmp_path_factory.mktemp("gw") / "data"
    env = {
        "GATEWAY_QUOTAS__FILES": "2",
        "GATEWAY_QUOTAS__QUEUED_JOBS": "1",
        "GATEWAY_QUOTAS__TOKENS_PER_MINUTE": str(TOKENS_PER_MINUTE),
        "GATEWAY_LIMITS__UNAUTHENTICATED_PER_MINUTE": "5",
        "GATEWAY_AUDIT__PATH": str(audit_fs / "audit.jsonl"),
        "GATEWAY_AUDIT__PROBE_SECONDS": "0.5",
    }
    yield from running(Gateway(data_dir=data, certs=certs, model_dir=model_dir, extra_env=env), "--no-worker")


def _client(
    gateway: Gateway, org: str, scope: str = "chat models:read files:read files:write"
) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway.base_url,
        api_key=gateway.token(scope + " fine_tuning:read fine_tuning:write", sub=f"u-{org}", org=org),
        http_client=httpx.Client(verify=gateway.verify(), timeout=120),
        max_retries=0,  # the SDK would otherwise honour Retry-After and hide the 429
    )


def _jsonl() -> bytes:
    return b"".join(json.dumps(row, ensure_ascii=False).encode() + b"\n" for row in finance_rows(8))


def _error_body(exc: openai.APIStatusError) -> dict[str, object]:
    body = exc.response.json()
    validate("ErrorResponse", body)
    error: dict[str, object] = body["error"]
    return error


def test_file_count_quota_is_403_quota_exceeded(gateway: Gateway) -> None:
    client = _client(gateway, "files-org")
    kept = [client.files.create(file=("t.jsonl", _jsonl()), purpose="fine-tune") for _ in range(2)]
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.files.create(file=("t.jsonl", _jsonl()), purpose="fine-tune")
    error = _error_body(refused.value)
    assert refused.value.status_code == 403 and error["code"] == "quota_exceeded"
    assert "quota of 2 files" in str(error["message"])
    assert len([f for f in client.files.list() if f.id in {k.id for k in kept}]) == 2
    client.files.delete(kept[0].id)
    assert client.files.create(file=("t.jsonl", _jsonl()), purpose="fine-tune").id


def test_waiting_jobs_quota_is_429_with_retry_after(gateway: Gateway) -> None:
    client = _client(gateway, "jobs-org")
    training = client.files.create(file=("t.jsonl", _jsonl()), purpose="fine-tune")
    first = client.fine_tuning.jobs.create(model=MODEL, training_file=training.id)
    with pytest.raises(openai.RateLimitError) as refused:
        client.fine_tuning.jobs.create(model=MODEL, training_file=training.id)
    assert _error_body(refused.value)["code"] == "quota_exceeded"
    assert int(refused.value.response.headers["retry-after"]) >= 1
    client.fine_tuning.jobs.cancel(first.id)  # no worker here: it waits until cancelled
    assert client.fine_tuning.jobs.create(model=MODEL, training_file=training.id).id


def test_tokens_per_minute_quota_is_429_with_retry_after(gateway: Gateway) -> None:
    client = _client(gateway, "tpm-org")
    used = 0
    messages = [{"role": "user", "content": "Name three colours of the rainbow, please."}]
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(20):
            done = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)  # type: ignore[arg-type]
            assert done.usage is not None
            used += done.usage.total_tokens
    assert used >= TOKENS_PER_MINUTE - 1  # refused only once the minute's tokens were really spent
    error = _error_body(refused.value)
    assert error["code"] == "rate_limit_exceeded" and f"{TOKENS_PER_MINUTE} tokens per minute" in str(
        error["message"]
    )
    assert int(refused.value.response.headers["retry-after"]) >= 1
    other = _client(gateway, "other-org").chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=2,
    )
    assert other.choices[0].message.content is not None


def _curl(gateway: Gateway, path: str, token: str) -> tuple[int, dict[str, str]]:
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            gateway.ca,
            "-o",
            "/dev/null",
            "-D",
            "-",
            "-H",
            f"Authorization: Bearer {token}",
            gateway.url + path,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = out.strip().splitlines()
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:]) if v}
    return status, headers


def _audit_records(gateway: Gateway) -> list[dict[str, object]]:
    path = Path(gateway.env()["GATEWAY_AUDIT__PATH"])
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_an_unauthenticated_flood_gets_429_and_no_record_each(gateway: Gateway) -> None:
    before = len(_audit_records(gateway))
    answers = [_curl(gateway, "/v1/models", "garbage") for _ in range(25)]
    statuses = [status for status, _ in answers]
    assert statuses.count(401) <= 5 and statuses[-1] == 429 and statuses.count(429) >= 20
    assert int(answers[-1][1]["retry-after"]) >= 1
    with _client(gateway, "flood-org") as client:  # a real token from the same address still works
        assert client.models.list().data
    added = _audit_records(gateway)[before:]
    refused_records = [r for r in added if r.get("route") == "/v1/models" and r.get("status") in (401, 429)]
    assert len(refused_records) == statuses.count(401)  # the 429s cost no record of their own


@contextlib.contextmanager
def _full(fs: Path) -> Iterator[None]:
    """Fill the audit filesystem to the last byte (unbuffered, in ever smaller writes); free it on leaving."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    try:
        yield
    finally:
        filler.unlink()


def test_a_full_audit_disk_gets_503_and_readyz_recovers(gateway: Gateway, audit_fs: Path) -> None:
    client = _client(gateway, "audit-org")
    messages = [{"role": "user", "content": "Say hi."}]
    with gateway.client() as http:
        assert http.get("/readyz").json()["audit"] is True
    with _full(audit_fs):
        # the log's last page may still hold a few records: cheap requests use it up, then appends fail
        with gateway.client(gateway.token("models:read", org="audit-org")) as http:
            statuses = [http.get("/v1/models").status_code for _ in range(60)]
        assert 503 in statuses and statuses[statuses.index(503) :] == [503] * (60 - statuses.index(503))
        with pytest.raises(openai.InternalServerError) as refused:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)  # type: ignore[arg-type]
        assert refused.value.status_code == 503
        assert _error_body(refused.value)["code"] == "audit_unavailable"
        with pytest.raises(openai.InternalServerError):  # a stream is refused before its first byte
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, stream=True)  # type: ignore[arg-type]
        with gateway.client() as http:
            ready = http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["audit"] is False
            assert http.get("/healthz").status_code == 200
    deadline = time.monotonic() + 30
    with gateway.client() as http:
        while http.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "readyz did not recover once the disk had room"
            time.sleep(0.2)
    done = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)  # type: ignore[arg-type]
    assert done.choices[0].message.content is not None
    recovered = [r for r in _audit_records(gateway) if r.get("action") == "audit.recovered"]
    assert recovered and int(recovered[-1]["count"]) >= 2  # type: ignore[call-overload]
    verify = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "audit", "verify"],
        env=gateway.env(),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
