"""Fail closed: a request whose audit record cannot be written gets 503 audit_unavailable and no content;
while the log is unavailable nothing reaches the app; /readyz says "audit": false until the probe's
`audit.recovered` record is written.  The failure is real: fsync on the log's descriptor raises ENOSPC."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient
from litestar.types import Message, Receive, Scope, Send

from gateway.app import create_app, services_of
from gateway.audit.log import AuditLog
from gateway.audit.middleware import AuditMiddleware
from gateway.audit.verify import verify_chain
from gateway.auth.keys import ensure_dev_keys
from gateway.auth.tokens import mint_dev_token
from gateway.core.settings import AuditSettings, LimitSettings, Settings
from tests.spec import validate
from tests.unit.fake_engine import FakeEngine

KEY = b"k" * 32
BASE = "smollm2-135m-instruct"


class DiskFull:
    """Makes fsync of one descriptor fail with ENOSPC while `full` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, audit: AuditLog) -> None:
        self.full = False
        real = os.fsync
        fd = audit._fd

        def fsync(target: Any) -> None:
            if self.full and target == fd:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(target)

        monkeypatch.setattr(os, "fsync", fsync)


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(tmp_path / "audit.jsonl", KEY)
    yield log
    log.close()


def _scope(path: str = "/v1/chat/completions") -> Scope:
    return {"type": "http", "method": "POST", "path": path, "headers": [], "client": ("10.1.2.3", 5)}  # type: ignore[return-value]


async def _disconnect() -> Message:
    return {"type": "http.disconnect"}


def _run(middleware: AuditMiddleware, path: str = "/v1/chat/completions") -> list[Message]:
    sent: list[Message] = []

    async def collect(message: Message) -> None:
        sent.append(message)

    asyncio.run(middleware(_scope(path), _disconnect, collect))
    return sent


def test_a_stream_whose_record_fails_is_cut_before_its_end(
    audit: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = DiskFull(monkeypatch, audit)

    async def streaming_app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 0\n\n", "more_body": True})
        disk.full = True  # the disk fills while the stream runs
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    sent = _run(AuditMiddleware(streaming_app, audit))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[-1]["more_body"] is True  # never completed: the client sees a broken stream
    assert not audit.available


def test_while_unavailable_nothing_reaches_the_app_and_the_probe_recovers(
    audit: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = DiskFull(monkeypatch, audit)
    calls: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"SECRET-ANSWER"})

    middleware = AuditMiddleware(app, audit)
    disk.full = True
    first = _run(middleware)
    assert first[0]["status"] == 503 and b"SECRET-ANSWER" not in first[1]["body"]
    assert calls == ["/v1/chat/completions"]  # it ran, but its answer was withheld
    for _ in range(3):
        refused = _run(middleware)
        assert refused[0]["status"] == 503 and dict(refused[0]["headers"])[b"retry-after"] == b"5"
    assert calls == ["/v1/chat/completions"]  # refused before the app: nothing done unaudited
    assert _run(middleware, "/readyz")[0]["status"] == 200  # health probes are still answered
    assert calls[-1] == "/readyz"
    assert not audit.probe()  # still full
    disk.full = False
    assert audit.probe() and audit.available
    assert _run(middleware)[0]["status"] == 200
    records = audit.read_page(0, 100)
    recovered = [r for r in records if r.get("action") == "audit.recovered"]
    assert len(recovered) == 1 and recovered[0]["count"] == 4  # 3 refused + 1 unrecorded probe
    assert isinstance(recovered[0]["since"], str)
    assert verify_chain(audit.path, KEY).ok


def test_on_the_app_chat_gets_503_and_readyz_turns_unready_then_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(
        data_dir=str(tmp_path / "data"),
        limits=LimitSettings(requests_per_minute=0),
        audit=AuditSettings(probe_seconds=0.05),
    )
    ensure_dev_keys(settings)
    app = create_app(settings, engines={BASE: FakeEngine()})
    token = mint_dev_token(settings, sub="u", org="acme", scope="chat", ttl_seconds=600)
    headers = {"Authorization": f"Bearer {token}"}
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(app) as client:
        audit = services_of(app).audit_log
        assert client.get("/readyz").json()["audit"] is True
        disk = DiskFull(monkeypatch, audit)
        disk.full = True
        refused = client.post("/v1/chat/completions", json=body, headers=headers)
        assert refused.status_code == 503 and "fake reply" not in refused.text
        validate("ErrorResponse", refused.json())
        assert refused.json()["error"]["code"] == "audit_unavailable"
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True}, headers=headers)
        assert streamed.status_code == 503 and "data:" not in streamed.text  # before the first byte
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["audit"] is False
        assert client.get("/healthz").status_code == 200
        disk.full = False
        for _ in range(100):  # the app's probe (every 0.05 s here) writes audit.recovered
            if client.get("/readyz").status_code == 200:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert client.get("/readyz").json()["audit"] is True
        assert client.post("/v1/chat/completions", json=body, headers=headers).status_code == 200
    assert verify_chain(audit.path, audit._key).ok
