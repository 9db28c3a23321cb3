"""GET /metrics: scraped through the real app (audit wrapper, guards, chat service) with a fake engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.auth.keys import ensure_dev_keys
from gateway.auth.tokens import mint_dev_token
from gateway.core.settings import AuthSettings, LimitSettings, Settings
from gateway.engine.base import ChoiceDelta, EngineStats, GenerationRequest
from gateway.observability.metrics import GatewayMetrics
from tests.unit import fake_engine
from tests.unit.peer import REMOTE, Peer

MODEL = "smollm2-135m-instruct"
SECRET_PROMPT = "my-patient-id-4711 has diabetes"
SECRET_REPLY = "confidential-reply-text"


class FakeStream:
    def __init__(self, prompt_tokens: int, pieces: list[str]) -> None:
        self.prompt_tokens = prompt_tokens
        self._pieces = pieces

    async def _deltas(self) -> AsyncIterator[ChoiceDelta]:
        for i, piece in enumerate(self._pieces):
            await asyncio.sleep(0)
            last = i == len(self._pieces) - 1
            yield ChoiceDelta(index=0, text=piece, token_count=1, finish_reason="stop" if last else None)

    def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        return self._deltas()

    async def aclose(self) -> None:
        return None


class FakeEngine(fake_engine.FakeEngine):
    """The shared fake with fixed load figures and a reply that must never reach a metric."""

    def __init__(self) -> None:
        super().__init__(MODEL)
        self.running, self.queued, self.adapters = 3, 1, 2

    async def submit(self, request: GenerationRequest) -> FakeStream:  # type: ignore[override]
        return FakeStream(prompt_tokens=7, pieces=[SECRET_REPLY, " and", " more"])

    def has_adapter(self, name: str) -> bool:
        return True

    def stats(self) -> EngineStats:
        return EngineStats(
            running=self.running, queued=self.queued, adapters=self.adapters, max_running=16, max_queued=64
        )


def _settings(tmp_path: Path, *, access: str, requests_per_minute: int = 600) -> Settings:
    settings = Settings(
        data_dir=str(tmp_path / "data"),
        auth=AuthSettings(metrics_access=access),
        limits=LimitSettings(requests_per_minute=requests_per_minute),
    )
    ensure_dev_keys(settings)
    return settings


def _token(settings: Settings, scope: str) -> dict[str, str]:
    token = mint_dev_token(settings, sub="alice", org="acme", scope=scope, ttl_seconds=600)
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def public(tmp_path: Path, engine: FakeEngine) -> Iterator[tuple[TestClient[Any], Settings]]:
    settings = _settings(tmp_path, access="public")
    with TestClient(Peer(create_app(settings, engines={MODEL: engine}))) as client:
        yield client, settings


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _chat(client: TestClient[Any], headers: dict[str, str], *, stream: bool) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": SECRET_PROMPT}], "stream": stream}
    response = client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200
    if stream:
        assert SECRET_REPLY in response.text


def test_scrape_counts_requests_tokens_and_first_token(public: tuple[TestClient[Any], Settings]) -> None:
    client, settings = public
    headers = _token(settings, "chat models:read")
    before = _samples(client.get("/metrics").text)

    _chat(client, headers, stream=False)
    _chat(client, headers, stream=True)
    assert client.get("/v1/models", headers=headers).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    after = _samples(response.text)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    chat = {"route": "/v1/chat/completions", "method": "POST"}
    assert delta("gateway_http_requests_total", **chat, status="200") == 2
    assert delta("gateway_http_requests_total", route="/v1/models", method="GET", status="200") == 1
    assert delta("gateway_http_requests_total", route="/v1/models", method="GET", status="401") == 1
    assert delta("gateway_http_request_duration_seconds_count", **chat) == 2
    assert delta("gateway_prompt_tokens_total", model=MODEL, kind="base") == 14  # 7 per request
    assert delta("gateway_completion_tokens_total", model=MODEL, kind="base") == 6  # 3 per request
    # time to first token is measured on streamed responses only
    assert delta("gateway_time_to_first_token_seconds_count", model=MODEL, kind="base") == 1
    # the first scrape itself was counted by the time of the second
    assert _value(after, "gateway_http_requests_total", route="/metrics", method="GET", status="200") >= 1


def test_engine_gauges_are_read_at_scrape_time(
    public: tuple[TestClient[Any], Settings], engine: FakeEngine
) -> None:
    client, _ = public
    samples = _samples(client.get("/metrics").text)
    assert _value(samples, "gateway_engine_running_sequences", model=MODEL) == 3
    assert _value(samples, "gateway_engine_queued_sequences", model=MODEL) == 1
    assert _value(samples, "gateway_engine_loaded_adapters", model=MODEL) == 2
    assert _value(samples, "gateway_engine_max_running_sequences", model=MODEL) == 16
    engine.running, engine.queued, engine.adapters = 0, 0, 5
    samples = _samples(client.get("/metrics").text)
    assert _value(samples, "gateway_engine_running_sequences", model=MODEL) == 0
    assert _value(samples, "gateway_engine_queued_sequences", model=MODEL) == 0
    assert _value(samples, "gateway_engine_loaded_adapters", model=MODEL) == 5


def test_no_content_and_no_raw_paths_in_the_output(public: tuple[TestClient[Any], Settings]) -> None:
    client, settings = public
    headers = _token(settings, "chat models:read")
    _chat(client, headers, stream=True)
    _chat(client, headers, stream=False)
    assert client.get("/v1/secret-path-4711", headers=headers).status_code == 404
    assert client.get(f"/v1/models/{SECRET_PROMPT}", headers=headers).status_code == 404
    text = client.get("/metrics").text
    for secret in ("4711", "diabetes", "confidential", "alice", "acme"):
        assert secret not in text
    samples = _samples(text)
    assert (
        _value(samples, "gateway_http_requests_total", route="(unmatched)", method="GET", status="404") == 1
    )
    # a routed 404 keeps its template: the caller's model id is not a label
    assert (
        _value(
            samples, "gateway_http_requests_total", route="/v1/models/{model_id}", method="GET", status="404"
        )
        == 1
    )


def _assert_401(response: Any) -> None:
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "invalid_api_key"


@dataclass
class Scraper:
    client: TestClient[Any]
    peer: Peer  # set peer.host to call from another address
    settings: Settings

    def get(self, host: str, headers: dict[str, str] | None = None) -> Any:
        self.peer.host = host
        return self.client.get("/metrics", headers=headers or {})

    def token(self, scope: str) -> dict[str, str]:
        return _token(self.settings, scope)


@pytest.fixture
def scraper(tmp_path: Path, engine: FakeEngine) -> Iterator[Callable[..., Scraper]]:
    """`scraper(access)`: the real app with `auth.metrics_access = access`, called from a chosen peer."""
    with ExitStack() as stack:

        def start(access: str, **limits: int) -> Scraper:
            settings = _settings(tmp_path / access, access=access, **limits)
            peer = Peer(create_app(settings, engines={MODEL: engine}))
            return Scraper(stack.enter_context(TestClient(peer)), peer, settings)

        yield start


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
def test_loopback_mode_scrapes_from_loopback_without_a_token(
    scraper: Callable[..., Scraper], host: str
) -> None:
    response = scraper("loopback").get(host)
    assert response.status_code == 200
    assert "gateway_engine_running_sequences" in response.text


@pytest.mark.parametrize("host", [REMOTE, "10.1.2.3", "::ffff:10.1.2.3", "2001:db8::7", "testclient"])
def test_loopback_mode_needs_admin_from_anywhere_else(scraper: Callable[..., Scraper], host: str) -> None:
    scrape = scraper("loopback")
    _assert_401(scrape.get(host))
    garbage = scrape.get(host, {"Authorization": "Bearer garbage"})
    assert garbage.status_code == 401
    assert garbage.headers["www-authenticate"].startswith("Bearer error=")
    denied = scrape.get(host, scrape.token("chat models:read files:read fine_tuning:read"))
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "insufficient_scope"
    allowed = scrape.get(host, scrape.token("admin"))
    assert allowed.status_code == 200
    assert "gateway_engine_running_sequences" in allowed.text


@pytest.mark.parametrize(
    "header",
    [
        {"X-Forwarded-For": "198.51.100.4"},
        {"X-Forwarded-For": "127.0.0.1"},
        {"Forwarded": "for=198.51.100.4"},
        {"X-Real-IP": "198.51.100.4"},
    ],
)
def test_loopback_mode_treats_a_proxied_request_as_remote(
    scraper: Callable[..., Scraper], header: dict[str, str]
) -> None:
    scrape = scraper("loopback")
    _assert_401(scrape.get("127.0.0.1", header))
    assert scrape.get("127.0.0.1", {**header, **scrape.token("admin")}).status_code == 200


def test_loopback_mode_opens_metrics_only(scraper: Callable[..., Scraper]) -> None:
    """A local peer scrapes without a token, and that is all it gets without one."""
    scrape = scraper("loopback")
    scrape.peer.host = "127.0.0.1"
    assert scrape.client.get("/metrics").status_code == 200
    _assert_401(scrape.client.get("/v1/models"))
    _assert_401(scrape.client.get("/v1/audit"))


def test_a_remote_scrape_is_rate_limited_like_any_request(scraper: Callable[..., Scraper]) -> None:
    scrape = scraper("loopback", requests_per_minute=1)
    admin = scrape.token("admin")
    assert scrape.get(REMOTE, admin).status_code == 200
    limited = scrape.get(REMOTE, admin)
    assert limited.status_code == 429
    assert "retry-after" in limited.headers
    # a local scrape names no subject to limit
    assert all(scrape.get("127.0.0.1").status_code == 200 for _ in range(3))


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", REMOTE])
def test_token_mode_needs_admin_even_from_loopback(scraper: Callable[..., Scraper], host: str) -> None:
    scrape = scraper("token")
    _assert_401(scrape.get(host))
    assert scrape.get(host, scrape.token("chat models:read")).status_code == 403
    assert scrape.get(host, scrape.token("admin")).status_code == 200


@pytest.mark.parametrize("host", ["127.0.0.1", REMOTE, "testclient"])
def test_public_mode_needs_no_token_from_anywhere(scraper: Callable[..., Scraper], host: str) -> None:
    response = scraper("public").get(host)
    assert response.status_code == 200
    assert "gateway_engine_running_sequences" in response.text


def test_openmetrics_when_asked(public: tuple[TestClient[Any], Settings]) -> None:
    client, _ = public
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_two_apps_do_not_share_metrics() -> None:
    a, b = GatewayMetrics(process=False), GatewayMetrics(process=False)
    a.observe_usage(MODEL, "base", 5, 2)
    assert (
        'gateway_prompt_tokens_total{kind="base",model="smollm2-135m-instruct"} 5.0' in a.render()[0].decode()
    )
    assert "gateway_prompt_tokens_total{" not in b.render()[0].decode()


def test_without_a_store_there_are_no_finetune_families() -> None:
    text = GatewayMetrics(process=False, store=lambda: None).render()[0].decode()
    assert "gateway_finetune" not in text


def test_finetune_jobs_and_training_throughput_from_the_store(tmp_path: Path) -> None:
    store_mod = pytest.importorskip("gateway.store")
    store = store_mod.Store.open(tmp_path)
    try:
        metrics = GatewayMetrics(process=False, store=lambda: store)
        samples = _samples(metrics.render()[0].decode())
        assert _value(samples, "gateway_finetune_jobs", status="queued") == 0
        assert _value(samples, "gateway_finetune_tokens_per_second") == 0

        def job(job_id: str, status: str) -> None:
            store.jobs.add(
                store_mod.JobRecord(
                    id=job_id,
                    tenant="acme",
                    subject="alice",
                    model=MODEL,
                    training_file="file-1",
                    seed=1,
                    hyperparameters={},
                    status=status,
                    created_at=1,
                )
            )

        job("ftjob-a", "running")
        job("ftjob-b", "queued")
        job("ftjob-c", "queued")
        job("ftjob-d", "succeeded")
        store.events.add("ftjob-a", "step 1", type="metrics", data={"step": 1, "tokens_per_second": 100.0})
        store.events.add("ftjob-a", "step 2", type="metrics", data={"step": 2, "tokens_per_second": 250.5})
        store.events.add("ftjob-d", "step 9", type="metrics", data={"step": 9, "tokens_per_second": 999.0})
        samples = _samples(metrics.render()[0].decode())
        assert _value(samples, "gateway_finetune_jobs", status="running") == 1
        assert _value(samples, "gateway_finetune_jobs", status="queued") == 2
        assert _value(samples, "gateway_finetune_jobs", status="succeeded") == 1
        assert _value(samples, "gateway_finetune_jobs", status="failed") == 0
        # the running job's latest step; a finished job's rate is history, not load
        assert _value(samples, "gateway_finetune_tokens_per_second") == 250.5
    finally:
        store.close()
