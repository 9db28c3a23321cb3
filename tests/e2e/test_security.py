"""Security properties of the real server (HTTPS subprocess, official openai SDK where a client is meant).

- JWT: an expired token -> openai.AuthenticationError; a missing scope -> openai.PermissionDeniedError; an
  HS256 token signed with the public key PEM as the secret (key confusion) and `alg: none` -> 401.
- Privacy: canary strings sent in a prompt, a streamed prompt, a legacy completion, an over-long prompt and
  invalid requests appear nowhere in the server's log, the audit log, the data dir or the server's TMPDIR.
- Audit: each request of a scenario leaves exactly one record with the right action/status/outcome, and the
  `x-request-id` header is that record's request_id; `gateway audit verify` passes, fails on an edited copy
  naming the line, and the chain continues and still verifies across a restart.
- Revocation: `gateway revoke --token` cuts off that token on the running server, nobody else.
- /metrics: open to a local scrape, a token with `admin` for a client a loopback proxy forwards for.
- The egress guard is on in the server, and everything under the data dir is 0600 (files) / 0700 (dirs).

The tests share one server (one of them restarts it); each passes alone and in any order.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest

from gateway.auth.tokens import mint_token
from tests.e2e.harness import REPO, Gateway, non_json_lines, running

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
RUN = uuid.uuid4().hex[:12]
CANARIES = {
    name: f"CANARY-{name}-{RUN}"
    for name in ("prompt", "stream", "completion", "toolong", "badfield", "badjson", "system")
}


@pytest.fixture(scope="module")
def server_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("server-tmp")
    path.chmod(0o700)
    return path


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, certs: Path, model_dir: Path, server_tmp: Path
) -> Iterator[Gateway]:
    data = tmp_path_factory.mktemp("gw-security") / "data"
    extra = {"TMPDIR": str(server_tmp)}
    yield from running(
        Gateway(data_dir=data, certs=certs, model_dir=model_dir, extra_env=extra), "--no-worker"
    )


def sdk(gateway: Gateway, token: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway.base_url,
        api_key=token,
        max_retries=0,
        http_client=httpx2.Client(verify=gateway.verify(), timeout=120),  # the SDK's own httpx
    )


def audit_path(gateway: Gateway) -> Path:
    return gateway.data_dir / "audit" / "audit.jsonl"


def audit_records(gateway: Gateway) -> list[dict[str, Any]]:
    return [json.loads(line) for line in audit_path(gateway).read_bytes().splitlines()]


def wait_for_records(gateway: Gateway, request_ids: set[str], timeout: float = 10) -> list[dict[str, Any]]:
    """The record is written just after the response is sent; give the last one a moment."""
    deadline = time.monotonic() + timeout
    while True:
        records = [r for r in audit_records(gateway) if r.get("request_id") in request_ids]
        if {r["request_id"] for r in records} >= request_ids or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def audit_verify(gateway: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "audit", "verify", *args],
        env=gateway.env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(gateway: Gateway, scope: str = "chat models:read") -> dict[str, Any]:
    settings = gateway.settings()
    now = int(time.time())
    return {
        "iss": settings.auth.issuer,
        "aud": settings.auth.audience,
        "sub": "mallory",
        "org": "acme",
        "iat": now,
        "exp": now + 600,
        "scope": scope,
    }


def _unsigned_token(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    if secret is None:
        return signing_input + "."
    return f"{signing_input}.{_b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


# ── JWT through the SDK ────────────────────────────────────────────────────────────────────────────────────


def test_expired_token_is_an_authentication_error(gateway: Gateway) -> None:
    settings = gateway.settings()
    private_pem = (gateway.data_dir / "keys" / "jwt-private.pem").read_bytes()
    expired = mint_token(
        private_pem,
        sub="tester",
        org="acme",
        scope="chat models:read",
        ttl_seconds=-3600,  # expired an hour ago, far past the leeway
        issuer=settings.auth.issuer,
        audience=settings.auth.audience,
        algorithm="EdDSA",
    )
    with pytest.raises(openai.AuthenticationError) as info:
        sdk(gateway, expired).models.list()
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"
    assert "expired" in info.value.message
    assert info.value.response.headers["www-authenticate"] == 'Bearer error="invalid_token"'


def test_missing_scope_is_a_permission_error(gateway: Gateway) -> None:
    client = sdk(gateway, gateway.token("models:read"))
    assert MODEL in [m.id for m in client.models.list().data]  # the token itself is good
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
    assert info.value.status_code == 403 and info.value.code == "insufficient_scope"
    assert 'scope="chat"' in info.value.response.headers["www-authenticate"]


def test_public_key_as_hmac_secret_is_refused(gateway: Gateway) -> None:
    public_pem = (gateway.data_dir / "keys" / "jwt-public.pem").read_bytes()
    claims = _claims(gateway, "admin chat models:read")
    for secret in (public_pem, public_pem.strip()):
        forged = _unsigned_token({"alg": "HS256", "typ": "JWT"}, claims, secret)
        with pytest.raises(openai.AuthenticationError) as info:
            sdk(gateway, forged).models.list()
        assert info.value.status_code == 401
    unsigned = _unsigned_token({"alg": "none", "typ": "JWT"}, claims, None)
    with pytest.raises(openai.AuthenticationError):
        sdk(gateway, unsigned).models.list()
    with gateway.client(forged) as client:
        response = client.get("/v1/audit")
        assert response.status_code == 401 and forged not in response.text


def test_a_revoked_token_stops_working_at_once(gateway: Gateway) -> None:
    leaked, colleague = gateway.token(sub="leaver"), gateway.token(sub="stayer")
    assert sdk(gateway, leaked).models.list().data  # good until revoked
    revoke = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "revoke", "--token", leaked],
        env=gateway.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert revoke.returncode == 0, revoke.stderr
    with pytest.raises(openai.AuthenticationError) as info:  # the running server re-reads the list
        sdk(gateway, leaked).models.list()
    assert "revoked" in info.value.message
    assert info.value.response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert sdk(gateway, colleague).models.list().data  # nobody else is affected


def test_metrics_are_open_to_a_local_scrape_only(gateway: Gateway) -> None:
    """auth.metrics_access = "loopback" (the default): this test is the Prometheus on the same host.  A
    request a loopback proxy forwards for another machine is not local: uvicorn takes the client from
    X-Forwarded-For (the audit record names it), and that client needs a token with `admin`."""
    forwarded = {"X-Forwarded-For": "198.51.100.4"}
    with gateway.client() as client:
        local = client.get("/metrics")
        assert local.status_code == 200 and "gateway_http_requests_total" in local.text
        proxied = client.get("/metrics", headers=forwarded)
        assert proxied.status_code == 401 and proxied.headers["www-authenticate"] == "Bearer"
        assert proxied.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models").status_code == 401  # loopback opens /metrics, nothing else
    with gateway.client(gateway.token("chat models:read files:read fine_tuning:read")) as client:
        assert client.get("/metrics", headers=forwarded).status_code == 403
    with gateway.client(gateway.token("admin", sub="prometheus")) as client:
        allowed = client.get("/metrics", headers=forwarded)
        assert allowed.status_code == 200 and "gateway_http_requests_total" in allowed.text
    ids = {proxied.headers["x-request-id"], allowed.headers["x-request-id"]}
    records = {r["request_id"]: r for r in wait_for_records(gateway, ids)}
    assert records[proxied.headers["x-request-id"]]["client"] == "198.51.100.4"
    assert records[allowed.headers["x-request-id"]]["subject"] == "prometheus"


# ── Privacy: canaries ──────────────────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def canaries_sent(gateway: Gateway) -> None:
    """Every canary has gone through the server once (in a prompt, a stream, a completion, errors)."""
    send_canaries(gateway)


def test_canaries_through_chat_stream_completions_and_errors(gateway: Gateway) -> None:
    send_canaries(gateway)


def send_canaries(gateway: Gateway) -> None:
    token = gateway.token("chat models:read")
    client = sdk(gateway, token)
    messages: Any = [
        {"role": "system", "content": f"Keep this secret: {CANARIES['system']}"},
        {"role": "user", "content": f"Repeat after me: {CANARIES['prompt']}"},
    ]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert answer.usage is not None and answer.usage.prompt_tokens > 10

    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"Say {CANARIES['stream']} twice."}],
        max_tokens=8,
        stream=True,
    )
    assert len(list(stream)) >= 2

    completion = client.completions.create(model=MODEL, prompt=f"{CANARIES['completion']} is", max_tokens=4)
    assert completion.choices

    too_long = " ".join([CANARIES["toolong"]] * 3000)  # far past max_model_len: refused with 400
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": too_long}])
    assert info.value.code == "context_length_exceeded"

    with gateway.client(token) as http:
        bad_field = {
            "model": MODEL,
            "messages": [{"role": "user", "content": CANARIES["badfield"]}],
            "temperature": CANARIES["badfield"],  # wrong type: the decoder refuses it
        }
        assert http.post("/v1/chat/completions", json=bad_field).status_code == 400
        broken = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "{CANARIES["badjson"]}'
        response = http.post(
            "/v1/chat/completions", content=broken, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400


def _files_containing(root: Path, needles: list[bytes]) -> dict[bytes, list[Path]]:
    """needle -> the files under root holding it (each file read once)."""
    hits: dict[bytes, list[Path]] = {needle: [] for needle in needles}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            for needle in needles:
                if needle in data:
                    hits[needle].append(path)
    return hits


def test_canaries_are_nowhere_on_disk_or_in_logs(
    gateway: Gateway, server_tmp: Path, canaries_sent: None
) -> None:
    time.sleep(0.5)  # the last records and log lines land just after the responses
    logs = gateway.logs()
    assert '"event"' in logs  # there is a structured log to search
    audit = audit_path(gateway).read_text()
    assert audit.count("\n") > 5
    assert gateway.process is not None  # and it really runs with the TMPDIR we scan
    environ = Path(f"/proc/{gateway.process.pid}/environ").read_bytes().split(b"\0")
    assert f"TMPDIR={server_tmp}".encode() in environ
    needles = [c.encode() for c in CANARIES.values()]
    on_disk = {root: _files_containing(root, needles) for root in (server_tmp, gateway.data_dir)}
    for name, canary in CANARIES.items():
        assert canary not in logs, f"{name} canary in the server log"
        assert canary not in audit, f"{name} canary in the audit log"
        for root, hits in on_disk.items():
            assert hits[canary.encode()] == [], f"{name} canary under {root}"


def test_canary_in_an_upload_is_only_in_the_stored_file(gateway: Gateway, server_tmp: Path) -> None:
    token = gateway.token("files:read files:write")
    canary = f"CANARY-upload-{RUN}"
    row = {"messages": [{"role": "user", "content": canary}, {"role": "assistant", "content": "ok"}]}
    uploaded = sdk(gateway, token).files.create(
        file=("train.jsonl", (json.dumps(row) + "\n").encode()), purpose="fine-tune"
    )
    assert uploaded.id.startswith("file-")
    time.sleep(0.5)
    assert canary not in gateway.logs() and canary not in audit_path(gateway).read_text()
    assert _files_containing(server_tmp, [canary.encode()]) == {canary.encode(): []}
    holders = _files_containing(gateway.data_dir, [canary.encode()])[canary.encode()]
    encrypted = gateway.settings().privacy.encrypt_at_rest
    assert len(holders) == (0 if encrypted else 1), holders  # the stored upload itself, nothing else
    assert holders in ([], [gateway.data_dir / "files" / uploaded.id]), holders


# ── The egress guard is on ─────────────────────────────────────────────────────────────────────────────────


def test_every_server_log_line_is_a_json_object(gateway: Gateway, canaries_sent: None) -> None:
    """uvicorn's own lines, library warnings, progress bars: none may break the JSON lines."""
    logs = gateway.logs()
    assert "uvicorn.error" in logs  # uvicorn's start-up lines are there, as JSON
    assert non_json_lines(logs) == []


def test_the_server_installed_its_egress_guard(gateway: Gateway) -> None:
    installed = [
        json.loads(line)
        for line in gateway.logs().splitlines()
        if line.startswith("{") and '"egress.guard_installed"' in line
    ]
    assert installed and installed[-1]["allow"] == []


# ── Audit ──────────────────────────────────────────────────────────────────────────────────────────────────

# (method, path, scope or None for no token, body, expected status, action, outcome)
SCENARIO: list[tuple[str, str, str | None, Any, int, str | None, str]] = [
    ("GET", "/healthz", None, None, 200, "health.live", "allowed"),
    ("GET", "/v1/models", "models:read", None, 200, "model.list", "allowed"),
    ("GET", f"/v1/models/{MODEL}", "models:read", None, 200, "model.retrieve", "allowed"),
    (
        "POST",
        "/v1/chat/completions",
        "chat",
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        200,
        "chat.completion.create",
        "allowed",
    ),
    ("POST", "/v1/chat/completions", None, {"model": MODEL}, 401, "chat.completion.create", "denied"),
    ("GET", "/v1/models", "chat", None, 403, "model.list", "denied"),
    ("POST", "/v1/chat/completions", "chat", {"model": MODEL}, 400, "chat.completion.create", "error"),
    ("GET", "/v1/models/no-such-model", "models:read", None, 404, "model.retrieve", "error"),
    ("DELETE", f"/v1/models/{MODEL}", "fine_tuning:write", None, 403, "model.delete", "denied"),
    ("GET", "/v1/nowhere", "admin", None, 404, None, "error"),
    ("GET", "/v1/audit?limit=5", "admin", None, 200, "audit.list", "allowed"),
]


def _run_scenario(gateway: Gateway, tag: str) -> dict[str, tuple[Any, ...]]:
    """Send the scenario; returns request_id -> (expected row + the echoed header)."""
    sent: dict[str, tuple[Any, ...]] = {}
    tokens = {
        scope: gateway.token(scope, sub="auditor", org="acme") for scope in {s[2] for s in SCENARIO} if scope
    }
    with httpx.Client(base_url=gateway.url, verify=gateway.verify(), timeout=120) as http:
        for index, (method, path, scope, body, status, action, outcome) in enumerate(SCENARIO):
            headers = {"Authorization": f"Bearer {tokens[scope]}"} if scope else {}
            if index % 2 == 0:  # half name their own request id, half get one made up for them
                headers["x-request-id"] = f"{tag}-{index}"
            response = http.request(method, path, headers=headers, json=body)
            assert response.status_code == status, (method, path, response.text)
            request_id = response.headers["x-request-id"]
            if index % 2 == 0:
                assert request_id == f"{tag}-{index}"
            else:
                assert len(request_id) == 32 and int(request_id, 16) >= 0
            sent[request_id] = (method, path, scope, status, action, outcome)
    return sent


def test_every_request_leaves_exactly_one_matching_record(gateway: Gateway) -> None:
    before = len(audit_records(gateway))
    sent = _run_scenario(gateway, f"scn-{RUN}")
    records = wait_for_records(gateway, set(sent))
    assert sorted(r["request_id"] for r in records) == sorted(sent)  # one each, none missing
    time.sleep(0.3)
    assert len(audit_records(gateway)) - before == len(SCENARIO)  # and nothing else was written
    for record in records:
        method, path, scope, status, action, outcome = sent[record["request_id"]]
        assert (record["method"], record["status"], record["action"], record["outcome"]) == (
            method,
            status,
            action,
            outcome,
        ), (path, record)
        identified = scope is not None and status != 401 and action is not None  # unrouted: no guard ran
        assert record["subject"] == ("auditor" if identified else None), record
        assert record["tenant"] == ("acme" if identified else None)
        assert record["client"] == "127.0.0.1"
        if action == "chat.completion.create" and status == 200:
            assert record["prompt_tokens"] > 0 and record["completion_tokens"] > 0
        if action == "model.retrieve":
            assert record["resource_id"] == path.rsplit("/", 1)[1]
        if action is None:
            assert record["route"] == "/v1/nowhere"


def test_audit_verify_passes_and_names_an_edited_line(gateway: Gateway, tmp_path: Path) -> None:
    result = audit_verify(gateway)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK ") and "chain intact" in result.stdout

    copy = tmp_path / "audit.jsonl"
    shutil.copy(audit_path(gateway), copy)
    shutil.copy(audit_path(gateway).with_name("audit.jsonl.head"), tmp_path / "audit.jsonl.head")
    assert audit_verify(gateway, "--log", str(copy)).returncode == 0
    lines = copy.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[2])
    record["status"] = 200 if record["status"] != 200 else 201  # an admin quietly rewrites history
    lines[2] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    copy.write_bytes(b"".join(lines))
    tampered = audit_verify(gateway, "--log", str(copy))
    assert tampered.returncode == 1
    assert tampered.stdout.startswith("TAMPERED") and "line 3" in tampered.stdout
    assert "first bad line 3" in tampered.stdout

    shutil.copy(audit_path(gateway), copy)  # cutting the last record off shows too (the head file)
    copy.write_bytes(b"".join(copy.read_bytes().splitlines(keepends=True)[:-1]))
    assert audit_verify(gateway, "--log", str(copy)).returncode == 1


def test_data_dir_files_are_0600_and_dirs_0700(gateway: Gateway) -> None:
    assert stat.S_IMODE(gateway.data_dir.stat().st_mode) == 0o700
    wrong = []
    for path in gateway.data_dir.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_symlink():
            wrong.append(f"{path} is a symlink")
        elif path.is_dir() and mode != 0o700:
            wrong.append(f"{path} dir {oct(mode)}")
        elif path.is_file() and mode != 0o600:
            wrong.append(f"{path} file {oct(mode)}")
    assert not wrong, wrong
    assert (gateway.data_dir / "keys" / "audit.key").is_file()


def test_the_chain_continues_across_a_restart(gateway: Gateway) -> None:
    last = audit_records(gateway)[-1]
    gateway.stop()
    gateway.start("--no-worker")
    sent = _run_scenario(gateway, f"rst-{RUN}")
    wait_for_records(gateway, set(sent))
    records = audit_records(gateway)
    position = next(i for i, r in enumerate(records) if r["seq"] == last["seq"])
    after = records[position + 1]
    assert after["seq"] == last["seq"] + 1 and after["prev"] == last["mac"]  # no new genesis
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    result = audit_verify(gateway)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK ") and f"{len(records)} record(s)" in result.stdout
