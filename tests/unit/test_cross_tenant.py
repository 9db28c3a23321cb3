"""Tenancy on the real app (create_app, fake engine): another tenant gets 404 for every object, exactly as for
an id that does not exist, and never sees it in a list; admins see across tenants.

Objects: fine-tuned model (retrieve, delete, chat), file (retrieve, content, delete, use as training file),
fine-tuning job (retrieve, cancel, events, checkpoints).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from gateway.app import create_app, services_of
from gateway.auth.keys import ensure_dev_keys
from gateway.auth.tokens import mint_dev_token
from gateway.core.settings import LimitSettings, Settings
from tests.unit.fake_engine import FakeEngine
from tests.unit.training_files import chat_jsonl

BASE = "smollm2-135m-instruct"
ALL = "models:read chat files:read files:write fine_tuning:read fine_tuning:write"
TRAINING = chat_jsonl(12)


@dataclass
class Tenancy:
    client: TestClient[Any]
    app: Any
    settings: Settings
    tmp: Path

    def headers(self, org: str, scope: str = ALL, sub: str | None = None) -> dict[str, str]:
        token = mint_dev_token(self.settings, sub=sub or f"user-{org}", org=org, scope=scope, ttl_seconds=300)
        return {"Authorization": f"Bearer {token}"}

    @property
    def acme(self) -> dict[str, str]:
        return self.headers("acme")

    @property
    def globex(self) -> dict[str, str]:
        return self.headers("globex")

    @property
    def admin(self) -> dict[str, str]:
        return self.headers("ops", "admin", sub="root")


@pytest.fixture
def tenancy(tmp_path: Path) -> Iterator[Tenancy]:
    settings = Settings(data_dir=str(tmp_path / "data"), limits=LimitSettings(requests_per_minute=0))
    ensure_dev_keys(settings)
    app = create_app(settings, engines={BASE: FakeEngine()})
    with TestClient(app) as client:
        yield Tenancy(client, app, settings, tmp_path)


def assert_hidden(t: Tenancy, method: str, path: str, obj_id: str, **kw: Any) -> None:
    """globex gets the same 404 for acme's object as for an id that never existed."""
    theirs = t.client.request(method, path, headers=t.globex, **kw)
    missing_id = obj_id[:-4] + "zzzz"
    nothing = t.client.request(method, path.replace(obj_id, missing_id), headers=t.globex, **kw)
    assert theirs.status_code == 404, (method, path, theirs.status_code, theirs.text)
    assert nothing.status_code == 404
    assert theirs.json() == json.loads(nothing.text.replace(missing_id, obj_id)), (theirs.text, nothing.text)


def test_fine_tuned_model_is_invisible_to_other_tenants(tenancy: Tenancy) -> None:
    t = tenancy
    model_id = f"ft:{BASE}:acme::abcd1234"
    adapter = t.tmp / "adapter"
    adapter.mkdir()
    registry = services_of(t.app).registry
    registry.register_adapter(model_id, base=BASE, tenant="acme", path=adapter, created=1, preload=False)

    assert t.client.get(f"/v1/models/{model_id}", headers=t.acme).json()["owned_by"] == "acme"
    assert model_id in [m["id"] for m in t.client.get("/v1/models", headers=t.acme).json()["data"]]

    assert model_id not in [m["id"] for m in t.client.get("/v1/models", headers=t.globex).json()["data"]]
    assert_hidden(t, "GET", f"/v1/models/{model_id}", model_id)
    assert_hidden(t, "DELETE", f"/v1/models/{model_id}", model_id)
    chat = {"model": model_id, "messages": [{"role": "user", "content": "hi"}]}
    for path in ("/v1/chat/completions", "/v1/completions"):
        body = chat if "chat" in path else {"model": model_id, "prompt": "hi"}
        response = t.client.post(path, json=body, headers=t.globex)
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"

    assert model_id in [m["id"] for m in t.client.get("/v1/models", headers=t.admin).json()["data"]]
    assert t.client.get(f"/v1/models/{model_id}", headers=t.acme).status_code == 200  # still there


def _upload(t: Tenancy, headers: dict[str, str]) -> str:
    response = t.client.post(
        "/v1/files",
        files={"file": ("train.jsonl", TRAINING, "application/jsonl")},
        data={"purpose": "fine-tune"},
        headers=headers,
    )
    assert response.status_code == 200, response.text
    file_id: str = response.json()["id"]
    return file_id


def _ids(response: Any) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["data"]]


def test_files_are_invisible_to_other_tenants(tenancy: Tenancy) -> None:
    t = tenancy
    file_id = _upload(t, t.acme)
    theirs = _upload(t, t.globex)

    assert _ids(t.client.get("/v1/files", headers=t.globex)) == [theirs]
    assert _ids(t.client.get("/v1/files", headers=t.acme)) == [file_id]
    assert_hidden(t, "GET", f"/v1/files/{file_id}", file_id)
    assert_hidden(t, "GET", f"/v1/files/{file_id}/content", file_id)
    assert_hidden(t, "DELETE", f"/v1/files/{file_id}", file_id)

    assert t.client.get(f"/v1/files/{file_id}/content", headers=t.acme).content == TRAINING  # not deleted
    assert sorted(_ids(t.client.get("/v1/files", headers=t.admin))) == sorted([file_id, theirs])
    assert t.client.get(f"/v1/files/{file_id}", headers=t.admin).status_code == 200


def test_jobs_are_invisible_to_other_tenants(tenancy: Tenancy) -> None:
    t = tenancy
    file_id = _upload(t, t.acme)

    # globex cannot even name acme's file as its training data
    stolen = t.client.post(
        "/v1/fine_tuning/jobs", json={"model": BASE, "training_file": file_id}, headers=t.globex
    )
    assert stolen.status_code in (400, 404), stolen.text
    assert file_id in stolen.text or stolen.json()["error"]["param"] == "training_file"
    never = t.client.post(
        "/v1/fine_tuning/jobs", json={"model": BASE, "training_file": "file-doesnotexist"}, headers=t.globex
    )
    assert never.status_code == stolen.status_code  # indistinguishable from a file that does not exist

    created = t.client.post(
        "/v1/fine_tuning/jobs", json={"model": BASE, "training_file": file_id}, headers=t.acme
    )
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    deadline = time.monotonic() + 30  # generous: only a failing run waits it out
    while not _ids(t.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=t.acme)):
        assert time.monotonic() < deadline, "the job never logged an event"
        time.sleep(0.05)

    assert _ids(t.client.get("/v1/fine_tuning/jobs", headers=t.globex)) == []
    assert _ids(t.client.get("/v1/fine_tuning/jobs", headers=t.acme)) == [job_id]
    for suffix in ("", "/events", "/checkpoints"):
        assert_hidden(t, "GET", f"/v1/fine_tuning/jobs/{job_id}{suffix}", job_id)
    assert_hidden(t, "POST", f"/v1/fine_tuning/jobs/{job_id}/cancel", job_id)

    assert t.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=t.acme).json()["status"] != "cancelled"
    assert _ids(t.client.get("/v1/fine_tuning/jobs", headers=t.admin)) == [job_id]
    assert t.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=t.admin).status_code == 200
