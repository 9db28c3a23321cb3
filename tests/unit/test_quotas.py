"""Per-tenant quotas (gateway/auth/quotas.py): the token bucket alone, then each quota on the real app
(create_app with a fake engine): stored bytes and file count (403 quota_exceeded), waiting jobs and tokens
per minute (429 with Retry-After), and running jobs where the worker claims them (store.jobs.claim)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from gateway.app import create_app, services_of
from gateway.auth.keys import ensure_dev_keys
from gateway.auth.quotas import Quotas, TokenBudget
from gateway.auth.tokens import mint_dev_token
from gateway.core.errors import QuotaExceeded, RateLimited
from gateway.core.settings import LimitSettings, QuotaSettings, Settings
from gateway.store import JobRecord, ModelRecord, Store, new_id
from tests.spec import validate
from tests.unit.fake_engine import FakeEngine
from tests.unit.training_files import chat_jsonl

BASE = "smollm2-135m-instruct"
SCOPES = "models:read chat files:read files:write fine_tuning:read fine_tuning:write"
ROWS = chat_jsonl(5)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the token bucket ----------------------------------------------------------------------------------------


def test_token_budget_lets_a_tenant_spend_its_minute_then_429s_until_it_refills() -> None:
    clock = Clock()
    budget = TokenBudget(600, clock=clock)  # 10 tokens a second
    budget.check("acme")
    budget.charge("acme", 650)  # one request may overdraw: it is charged what it really used
    with pytest.raises(RateLimited) as refused:
        budget.check("acme")
    assert refused.value.status_code == 429 and "600 tokens per minute" in refused.value.message
    assert refused.value.headers["Retry-After"] == "6"  # 50 tokens of debt + 1, at 10 a second
    budget.check("globex")  # another tenant is untouched
    clock.now += 6
    budget.check("acme")
    assert budget.remaining("acme") == pytest.approx(10.0)


def test_token_budget_forgets_idle_tenants_and_zero_disables_it() -> None:
    clock = Clock()
    budget = TokenBudget(60, clock=clock)
    for tenant in ("a", "b", "c"):
        budget.check(tenant)
        budget.charge(tenant, 30)
    assert len(budget) == 3
    clock.now += 31  # refilled: the same as a new bucket
    budget.check("d")
    assert len(budget) == 1
    off = TokenBudget(0, clock=clock)
    off.charge("a", 10**9)
    off.check("a")
    assert len(off) == 0


def test_storage_quota_names_the_limit_and_what_is_in_use() -> None:
    quotas = Quotas(QuotaSettings(files=2, stored_bytes=100))
    quotas.check_storage("acme", used_files=1, used_bytes=60, incoming_bytes=40)
    with pytest.raises(QuotaExceeded) as files:
        quotas.check_storage("acme", used_files=2, used_bytes=0, incoming_bytes=1)
    assert files.value.status_code == 403 and files.value.code == "quota_exceeded"
    assert "quota of 2 files (quotas.files)" in files.value.message
    with pytest.raises(QuotaExceeded) as size:
        quotas.check_storage("acme", used_files=1, used_bytes=60, incoming_bytes=41)
    assert "quota of 100 bytes" in size.value.message and "60 in use" in size.value.message
    Quotas(QuotaSettings(files=0, stored_bytes=0)).check_storage(
        "acme", used_files=10**6, used_bytes=10**12, incoming_bytes=10**9
    )


# -- on the app ----------------------------------------------------------------------------------------------


class Api:
    def __init__(self, client: TestClient[Any], settings: Settings, app: Any) -> None:
        self.client, self.settings, self.app = client, settings, app

    def headers(self, org: str = "acme") -> dict[str, str]:
        token = mint_dev_token(self.settings, sub=f"u-{org}", org=org, scope=SCOPES, ttl_seconds=600)
        return {"Authorization": f"Bearer {token}"}

    def upload(self, content: bytes = ROWS, org: str = "acme") -> Any:
        return self.client.post(
            "/v1/files",
            files={"file": ("t.jsonl", content)},
            data={"purpose": "fine-tune"},
            headers=self.headers(org),
        )

    def chat(self, org: str = "acme") -> Any:
        body = {"model": BASE, "messages": [{"role": "user", "content": "one two three four"}]}
        return self.client.post("/v1/chat/completions", json=body, headers=self.headers(org))

    @property
    def store(self) -> Store:
        return services_of(self.app).store


@pytest.fixture
def make_api(tmp_path: Path) -> Iterator[Any]:
    clients: list[TestClient[Any]] = []

    def make(**quotas: Any) -> Api:
        settings = Settings(
            data_dir=str(tmp_path / f"data{len(clients)}"),
            limits=LimitSettings(requests_per_minute=0),
            quotas=QuotaSettings(**quotas),
        )
        ensure_dev_keys(settings)
        app = create_app(settings, engines={BASE: FakeEngine()})
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return Api(client, settings, app)

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def _error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    validate("ErrorResponse", body)
    assert body["error"]["code"] == code
    return body["error"]


def test_file_count_quota_is_403_until_a_file_is_deleted(make_api: Any) -> None:
    api = make_api(files=2)
    first = api.upload().json()["id"]
    assert api.upload().status_code == 200
    error = _error(api.upload(), 403, "quota_exceeded")
    assert "quota of 2 files" in error["message"] and error["param"] == "file"
    assert api.upload(org="globex").status_code == 200  # per tenant
    assert api.store.files.usage("acme")[0] == 2  # nothing kept from the refused upload
    assert not list((Path(api.settings.data_dir) / "tmp").glob("upload-*"))
    assert api.client.delete(f"/v1/files/{first}", headers=api.headers()).status_code == 200
    assert api.upload().status_code == 200


def test_stored_bytes_quota_is_403_and_keeps_nothing(make_api: Any) -> None:
    api = make_api(stored_bytes=len(ROWS) * 2 + 10)
    assert api.upload().status_code == 200
    assert api.upload().status_code == 200
    error = _error(api.upload(), 403, "quota_exceeded")
    assert f"quota of {len(ROWS) * 2 + 10} bytes" in error["message"]
    assert f"{len(ROWS) * 2} in use" in error["message"]
    assert api.store.files.usage("acme") == (2, len(ROWS) * 2)
    assert len(list((Path(api.settings.data_dir) / "files").iterdir())) == 2


def _adapters_on_disk(api: Any, tenant: str, weights: int) -> ModelRecord:
    """A job's checkpoint export of `weights` bytes and its final adapter hard-linked to it, as the worker
    leaves them, with their model rows."""
    data, job = Path(api.settings.data_dir), api.store.jobs.add(_job(tenant, "succeeded")).id
    checkpoint, final = data / "adapters" / job / "ckpt-step-1", data / "adapters" / job / "final"
    checkpoint.mkdir(parents=True)
    final.mkdir()
    (checkpoint / "adapter_model.safetensors").write_bytes(b"w" * weights)
    (checkpoint / "adapter_config.json").write_bytes(b"{}")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        os.link(checkpoint / name, final / name)  # no second copy: counted once
    now = int(time.time())
    name = f"ft:{BASE}:{tenant}::{job[-8:]}"
    step = ModelRecord(
        f"{name}:ckpt-step-1", tenant, BASE, job, str(checkpoint.relative_to(data)), now, step=1
    )
    api.store.models.add(step)
    api.store.models.add(ModelRecord(name, tenant, BASE, job, str(final.relative_to(data)), now))
    return api.store.models.get(name)  # type: ignore[return-value]


def test_stored_bytes_count_the_tenants_adapters_and_checkpoint_exports(make_api: Any) -> None:
    api = make_api(stored_bytes=len(ROWS) + 1000)
    training = api.upload().json()["id"]
    first = _adapters_on_disk(api, "acme", weights=900)
    _adapters_on_disk(api, "globex", weights=5000)  # another tenant's adapters are not acme's
    in_use = len(ROWS) + 902
    assert api.store.usage("acme", Path(api.settings.data_dir)) == (1, in_use)
    error = _error(api.upload(), 403, "quota_exceeded")  # fits as files alone, not with the adapters
    assert f"{in_use} in use" in error["message"] and "fine-tuned models" in error["message"]
    assert api.store.files.usage("acme") == (1, len(ROWS))  # nothing kept
    body = {"model": BASE, "training_file": training}
    assert api.client.post("/v1/fine_tuning/jobs", json=body, headers=api.headers()).status_code == 200
    _adapters_on_disk(api, "acme", weights=200)  # now at the quota: a new job would add more
    refused = api.client.post("/v1/fine_tuning/jobs", json=body, headers=api.headers())
    assert "quotas.stored_bytes" in _error(refused, 403, "quota_exceeded")["message"]
    # deleting a fine-tuned model (its checkpoints go with it) frees its bytes
    for record in api.store.models.delete(first.id):
        shutil.rmtree(Path(api.settings.data_dir) / record.path)
    assert api.store.usage("acme", Path(api.settings.data_dir))[1] == len(ROWS) + 202
    assert api.client.post("/v1/fine_tuning/jobs", json=body, headers=api.headers()).status_code == 200


def test_waiting_jobs_quota_is_429_with_retry_after(make_api: Any) -> None:
    api = make_api(queued_jobs=2)
    training = api.upload().json()["id"]
    body = {"model": BASE, "training_file": training}
    for _ in range(2):
        created = api.client.post("/v1/fine_tuning/jobs", json=body, headers=api.headers())
        assert created.status_code == 200, created.text
    refused = api.client.post("/v1/fine_tuning/jobs", json=body, headers=api.headers())
    error = _error(refused, 429, "quota_exceeded")
    assert "quota of 2 (quotas.queued_jobs)" in error["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert len(api.store.jobs.list_page("acme").items) == 2
    job = api.store.jobs.list_page("acme").items[0]
    assert api.client.post(f"/v1/fine_tuning/jobs/{job.id}/cancel", headers=api.headers()).status_code == 200
    assert api.client.post("/v1/fine_tuning/jobs", json=body, headers=api.headers()).status_code == 200


def test_tokens_per_minute_quota_is_429_after_the_minute_is_spent(make_api: Any) -> None:
    api = make_api(tokens_per_minute=7)
    first = api.chat()
    assert first.status_code == 200, first.text
    usage = first.json()["usage"]
    assert usage["total_tokens"] == 7  # 4 prompt words + the fake reply: the minute is used up
    refused = api.chat()
    error = _error(refused, 429, "rate_limit_exceeded")
    assert "7 tokens per minute" in error["message"] and "quotas.tokens_per_minute" in error["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert api.chat(org="globex").status_code == 200


def _job(tenant: str, status: str = "queued") -> JobRecord:
    return JobRecord(
        id=new_id("ftjob-"),
        tenant=tenant,
        subject="alice",
        model="base",
        training_file="file-x",
        seed=1,
        hyperparameters={"n_epochs": 1},
        status=status,
        created_at=int(time.time()),
    )


def test_running_jobs_quota_lets_other_tenants_jobs_start_first(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    a1, a2, b1 = (store.jobs.add(_job(t)) for t in ("acme", "acme", "globex"))
    now = time.time()
    assert store.jobs.claim("w1", now=now, lease_seconds=30, tenant_running=1).id == a1.id  # type: ignore[union-attr]
    assert store.jobs.claim("w2", now=now, lease_seconds=30, tenant_running=1).id == b1.id  # type: ignore[union-attr]
    assert store.jobs.claim("w3", now=now, lease_seconds=30, tenant_running=1) is None  # acme is at 1
    assert store.jobs.update(a1.id, status="succeeded")
    assert store.jobs.claim("w3", now=now, lease_seconds=30, tenant_running=1).id == a2.id  # type: ignore[union-attr]
    store.close()


def test_a_running_job_whose_lease_ran_out_does_not_hold_the_quota(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    a1, a2 = store.jobs.add(_job("acme")), store.jobs.add(_job("acme"))
    now = time.time()
    assert store.jobs.claim("w1", now=now, lease_seconds=10, tenant_running=1).id == a1.id  # type: ignore[union-attr]
    # w1 died: at now+20 its lease is over, so its job is taken over first, then the quota holds again
    assert store.jobs.claim("w2", now=now + 20, lease_seconds=10, tenant_running=1).id == a1.id  # type: ignore[union-attr]
    assert store.jobs.claim("w3", now=now + 20, lease_seconds=10, tenant_running=1) is None
    assert a2.status == "queued"
    store.close()
