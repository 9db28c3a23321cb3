"""GET /v1/audit on the real app (fake engine), the rate limit through create_app, and AuditLog.page."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from gateway.app import create_app, services_of
from gateway.audit.log import AuditLog
from gateway.audit.pages import _first_line_after
from gateway.auth.keys import ensure_dev_keys
from gateway.auth.tokens import mint_dev_token
from gateway.core.settings import LimitSettings, Settings
from tests.unit.fake_engine import FakeEngine


def _settings(tmp_path: Path, rpm: int = 0) -> Settings:
    settings = Settings(data_dir=str(tmp_path / "data"), limits=LimitSettings(requests_per_minute=rpm))
    ensure_dev_keys(settings)
    return settings


def _bearer(settings: Settings, scope: str, sub: str = "alice", org: str = "acme") -> dict[str, str]:
    return {
        "Authorization": f"Bearer {mint_dev_token(settings, sub=sub, org=org, scope=scope, ttl_seconds=60)}"
    }


@pytest.fixture
def app_client(tmp_path: Path) -> Iterator[tuple[TestClient[Any], Settings]]:
    settings = _settings(tmp_path)
    with TestClient(create_app(settings, engines={"smollm2-135m-instruct": FakeEngine()})) as client:
        yield client, settings


def test_audit_route_is_admin_only_and_pages(app_client: tuple[TestClient[Any], Settings]) -> None:
    client, settings = app_client
    admin = _bearer(settings, "admin", sub="root", org="ops")
    for sub, org in [("alice", "acme"), ("bob", "globex"), ("alice", "acme")]:
        assert client.get("/v1/models", headers=_bearer(settings, "models:read", sub, org)).status_code == 200
    denied = client.get(
        "/v1/audit", headers=_bearer(settings, "models:read chat files:read fine_tuning:read")
    )
    assert denied.status_code == 403

    start = client.get("/v1/audit", params={"limit": 1}, headers=admin).json()["data"]
    assert [(r["seq"], r["action"]) for r in start] == [(1, "audit.chain_start")]  # how this chain began
    first = client.get("/v1/audit", params={"after": 1, "limit": 2}, headers=admin).json()
    assert first["object"] == "list" and first["has_more"] is True
    assert [r["seq"] for r in first["data"]] == [2, 3] and first["last_seq"] == 3
    assert [(r["subject"], r["tenant"], r["action"]) for r in first["data"]] == [
        ("alice", "acme", "model.list"),
        ("bob", "globex", "model.list"),
    ]
    assert {"seq", "prev", "mac", "request_id", "status", "outcome"} <= set(first["data"][0])

    rest = client.get("/v1/audit", params={"after": 3, "limit": 1000}, headers=admin).json()
    # record 4 (alice), 5 (the refused read), 6 and 7 (the first admin reads); this read is not on disk yet
    assert [r["seq"] for r in rest["data"]] == [4, 5, 6, 7] and rest["has_more"] is False
    assert rest["data"][1]["outcome"] == "denied" and rest["data"][1]["status"] == 403
    assert rest["data"][2]["action"] == "audit.list" and rest["data"][2]["subject"] == "root"

    acme = client.get("/v1/audit", params={"tenant": "acme", "limit": 1}, headers=admin).json()
    assert [r["seq"] for r in acme["data"]] == [2] and acme["has_more"] is True
    acme2 = client.get("/v1/audit", params={"tenant": "acme", "after": 2}, headers=admin).json()
    assert [r["tenant"] for r in acme2["data"]] == ["acme", "acme"]  # alice's read and the refused one
    assert acme2["has_more"] is False and acme2["last_seq"] == acme2["data"][-1]["seq"]

    empty = client.get("/v1/audit", params={"after": 10_000}, headers=admin).json()
    assert empty == {"object": "list", "data": [], "has_more": False, "last_seq": 10_000}


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"after": "-1"}, "after"),
        ({"after": "1e3"}, "after"),
        ({"tenant": ""}, "tenant"),
        ({"tenant": "x" * 300}, "tenant"),
    ],
)
def test_audit_route_rejects_bad_parameters(
    app_client: tuple[TestClient[Any], Settings], params: dict[str, str], param: str
) -> None:
    client, settings = app_client
    response = client.get("/v1/audit", params=params, headers=_bearer(settings, "admin"))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_rate_limit_through_the_app(tmp_path: Path) -> None:
    settings = _settings(tmp_path, rpm=5)
    app = create_app(settings, engines={"smollm2-135m-instruct": FakeEngine()})
    with TestClient(app) as client:
        headers = _bearer(settings, "models:read")
        statuses = [client.get("/v1/models", headers=headers).status_code for _ in range(5)]
        assert statuses == [200] * 5
        limited = client.get("/v1/models", headers=headers)
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["retry-after"]) <= 12  # one token back at 5/min takes 12 s
        assert limited.json() == {
            "error": {
                "message": "rate limit of 5 requests per minute exceeded",
                "type": "rate_limit_exceeded",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        }
        # per subject: someone else is not held up, and health checks never count
        assert (
            client.get("/v1/models", headers=_bearer(settings, "models:read", sub="bob")).status_code == 200
        )
        assert client.get("/healthz").status_code == 200
        records = services_of(app).audit_log.read_page(1, 100)  # after the chain's first record
        assert [r["status"] for r in records[:6]] == [200] * 5 + [429]
        assert records[5]["outcome"] == "denied"


def test_page_seeks_by_bisection_and_agrees_with_a_full_scan(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, b"k" * 32) as log:
        # appends from several threads share fsyncs (group commit), so 400 records stay quick
        def write(worker: int) -> None:
            for i in range(100):
                log.append({"tenant": f"t{worker}", "action": "x", "status": 200 + i % 3})

        threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        size = path.stat().st_size
        assert size > 60_000  # large enough that the bisection takes several steps
        with open(path, "rb") as fh:
            assert size // 2 < _first_line_after(fh, size, 300) < size  # it seeks, it does not scan
        everything = [json.loads(line) for line in path.read_bytes().splitlines()]
        for after in (0, 1, 2, 199, 200, 277, 398, 399, 400, 5000):
            page = log.page(after, 3)
            expected = [r for r in everything if r["seq"] > after][:3]
            assert page.records == expected, after
            assert page.has_more == (after + 3 < 401)  # 400 and the chain's first record
            assert page.last_seq == (expected[-1]["seq"] if expected else after)
        tenant = log.page(150, 1000, "t2")
        assert tenant.records == [r for r in everything if r["seq"] > 150 and r["tenant"] == "t2"]
        assert tenant.has_more is False
        assert len(log.page(0, 5000).records) == 401 and log.page(0, 5000).records == everything


def test_page_ignores_a_line_being_written(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, b"k" * 32) as log:
        for _ in range(2):
            log.append({"action": "x"})  # seq 2 and 3, after the chain's first record
        with open(path, "ab") as fh:
            fh.write(b'{"seq": 4, "half')  # an append in flight, as another reader would see it
        page = log.page(0, 10)
        assert [r["seq"] for r in page.records] == [1, 2, 3] and page.has_more is False
