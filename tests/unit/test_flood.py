"""Unauthenticated floods (gateway/audit/flood.py): past limits.unauthenticated_per_minute from one address,
refused requests with no identity get 429 and no record of their own; one summary record per address and
window counts them; authenticated requests from the same address are untouched."""

from __future__ import annotations

from pathlib import Path

from litestar.testing import TestClient

from gateway.app import create_app, services_of
from gateway.audit.flood import FLOOD_ACTION, UnauthenticatedFlood
from gateway.audit.verify import verify_chain
from gateway.auth.keys import ensure_dev_keys
from gateway.auth.tokens import mint_dev_token
from gateway.core.settings import LimitSettings, Settings
from tests.spec import validate
from tests.unit.fake_engine import FakeEngine

BASE = "smollm2-135m-instruct"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_budget_then_429_then_one_summary_per_window() -> None:
    clock = Clock()
    flood = UnauthenticatedFlood(3, clock=clock, window_seconds=60)
    assert [flood.refuse("10.0.0.1") for _ in range(3)] == [None, None, None]
    refusals = [flood.refuse("10.0.0.1") for _ in range(5)]
    assert all(r is not None and r.status_code == 429 for r in refusals)
    assert "limits.unauthenticated_per_minute" in refusals[0].message  # type: ignore[union-attr]
    assert int(refusals[0].headers["Retry-After"]) >= 1  # type: ignore[union-attr]
    assert flood.refuse("10.0.0.2") is None  # per address
    assert flood.due() == []  # the window is still open
    clock.now += 60
    [summary] = flood.due()
    assert summary["action"] == FLOOD_ACTION and summary["client"] == "10.0.0.1"
    assert summary["count"] == 5 and summary["status"] == 429 and summary["outcome"] == "denied"
    assert flood.due() == []
    assert UnauthenticatedFlood(0).refuse("10.0.0.1") is None  # 0: off


def test_on_the_app_a_bad_token_flood_costs_a_bounded_number_of_records(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=str(tmp_path / "data"),
        limits=LimitSettings(requests_per_minute=0, unauthenticated_per_minute=5),
    )
    ensure_dev_keys(settings)
    app = create_app(settings, engines={BASE: FakeEngine()})
    good = mint_dev_token(settings, sub="u", org="acme", scope="models:read", ttl_seconds=600)
    bad = {"Authorization": "Bearer not-a-token"}
    with TestClient(app) as client:
        audit = services_of(app).audit_log
        before = audit.last_seq
        statuses = [client.get("/v1/models", headers=bad).status_code for _ in range(30)]
        assert statuses == [401] * 5 + [429] * 25
        refused = client.get("/v1/models", headers=bad)
        validate("ErrorResponse", refused.json())
        assert refused.json()["error"]["code"] == "rate_limit_exceeded" and "retry-after" in refused.headers
        assert client.get("/nope").status_code == 429  # a scanner's 404s count too
        assert audit.last_seq - before == 5  # one record per request within the budget, none past it
        ok = client.get("/v1/models", headers={"Authorization": f"Bearer {good}"})
        assert ok.status_code == 200  # a real token from the same address still works
        assert client.get("/healthz").status_code == 200
    # shutdown flushes the open window: one summary record for the 27 refused requests
    records = audit.read_page(before, 1000)
    summaries = [r for r in records if r.get("action") == FLOOD_ACTION]
    assert len(summaries) == 1 and summaries[0]["count"] == 27 and summaries[0]["client"] == "testclient"
    assert len(records) == 5 + 1 + 1 + 1  # the 401s, the 200, /healthz, the summary
    assert verify_chain(audit.path, audit._key).ok
