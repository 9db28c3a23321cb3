"""The fine-tuning jobs API and the hot-load bridge on the real app (create_app, fake engine, no worker):
create/validate/queue, hyperparameter errors naming the field, list/retrieve/cancel/events/checkpoints with
OpenAI shapes, persistence across an app restart, fine-tuned models appearing, serving and being deleted."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from gateway.app import create_app, services_of
from gateway.auth.keys import ensure_dev_keys
from gateway.auth.tokens import mint_dev_token
from gateway.core.settings import LimitSettings, Settings
from gateway.store import CheckpointRecord, FileRecord, ModelRecord, Store, new_id
from tests.spec import validate
from tests.unit.fake_engine import FakeEngine

BASE = "smollm2-135m-instruct"
SCOPES = "models:read chat files:read files:write fine_tuning:read fine_tuning:write"
ROWS = b"".join(
    json.dumps(
        {"instruction": "分析客户风险等级", "input": f"年收入{i}万", "output": "低风险"}, ensure_ascii=False
    ).encode()
    + b"\n"
    for i in range(16)
)


@dataclass
class Api:
    client: TestClient[Any]
    settings: Settings
    engine: FakeEngine
    app: Any

    def headers(self, org: str = "acme", scope: str = SCOPES) -> dict[str, str]:
        token = mint_dev_token(self.settings, sub=f"u-{org}", org=org, scope=scope, ttl_seconds=600)
        return {"Authorization": f"Bearer {token}"}

    def upload(self, org: str = "acme") -> str:
        response = self.client.post(
            "/v1/files",
            files={"file": ("t.jsonl", ROWS)},
            data={"purpose": "fine-tune"},
            headers=self.headers(org),
        )
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    def create(self, body: dict[str, Any], org: str = "acme") -> Any:
        return self.client.post("/v1/fine_tuning/jobs", json=body, headers=self.headers(org))

    def get(self, path: str, org: str = "acme", **params: Any) -> Any:
        return self.client.get(path, params=params, headers=self.headers(org))

    @property
    def store(self) -> Store:
        return services_of(self.app).store


@contextmanager
def running(data_dir: Path) -> Iterator[Api]:
    settings = Settings(data_dir=str(data_dir), limits=LimitSettings(requests_per_minute=0))
    ensure_dev_keys(settings)
    engine = FakeEngine()
    app = create_app(settings, engines={BASE: engine})
    with TestClient(app) as client:
        yield Api(client, settings, engine, app)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    with running(tmp_path / "data") as a:
        yield a


def wait_for(check: Callable[[], Any], timeout: float = 30.0) -> Any:  # only a failing run waits it out
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
    return result


def _status(api: Api, job_id: str) -> str:
    return str(api.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"])


# -- create ------------------------------------------------------------------------------------------------


def test_create_validates_then_queues_with_openai_shape(api: Api) -> None:
    file_id = api.upload()
    body = {
        "model": BASE,
        "training_file": file_id,
        "suffix": "risk",
        "seed": 7,
        "metadata": {"team": "risk"},
        "method": {
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": 2,
                    "batch_size": "auto",
                    "learning_rate_multiplier": 2.0,
                    "lora_rank": 4,
                    "target_modules": "all-linear",
                    "quantization_bit": 4,
                    "max_seq_length": 128,
                }
            },
        },
        "stream_options": {"ignored": True},  # unknown fields are accepted and ignored
    }
    response = api.create(body)
    assert response.status_code == 200, response.text
    job = response.json()
    validate("FineTuningJob", job)
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert job["status"] == "validating_files" and job["model"] == BASE and job["organization_id"] == "acme"
    assert job["training_file"] == file_id and job["seed"] == 7 and job["metadata"] == {"team": "risk"}
    assert job["fine_tuned_model"] is None and job["finished_at"] is None and job["error"] is None
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 2.0}
    lora = job["method"]["supervised"]["hyperparameters"]
    assert lora["lora_rank"] == 4 and lora["quantization_bit"] == 4 and len(lora["target_modules"]) == 7
    wait_for(lambda: _status(api, job["id"]) == "queued")
    events = api.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()
    validate("ListFineTuningJobEventsResponse", events)
    messages = [e["message"] for e in events["data"]]
    assert messages[0] == "Files validated, moving job to queued state"  # newest first
    assert messages[-1] == f"Created fine-tuning job: {job['id']}"


def test_the_deprecated_top_level_hyperparameters_still_work(api: Api) -> None:
    job = api.create(
        {"model": BASE, "training_file": api.upload(), "hyperparameters": {"n_epochs": 5}}
    ).json()
    assert job["hyperparameters"]["n_epochs"] == 5 and job["method"]["type"] == "supervised"
    assert job["seed"] >= 0  # a seed is always chosen and reported


@pytest.mark.parametrize(
    ("hyper", "param"),
    [
        ({"n_epochs": 0}, "n_epochs"),
        ({"batch_size": 1000}, "batch_size"),
        ({"learning_rate_multiplier": 0}, "learning_rate_multiplier"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"quantization_bit": 5}, "quantization_bit"),
        ({"target_modules": ["q_proj", "wat"]}, "target_modules"),
        ({"learning_rate": -1}, "learning_rate"),
        ({"max_seq_length": 2}, "max_seq_length"),
        ({"gradient_accumulation_steps": "many"}, "gradient_accumulation_steps"),
        ({"lora_alpha": 0.5}, "lora_alpha"),
        ({"learning_rate": 0.5, "learning_rate_multiplier": 4}, "learning_rate_multiplier"),
    ],
)
def test_invalid_hyperparameters_name_the_field(api: Api, hyper: dict[str, Any], param: str) -> None:
    file_id = api.upload()
    body = {
        "model": BASE,
        "training_file": file_id,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
    }
    response = api.create(body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == f"method.supervised.hyperparameters.{param}", error
    assert error["type"] == "invalid_request_error"
    legacy = api.create({"model": BASE, "training_file": file_id, "hyperparameters": hyper}).json()["error"]
    assert legacy["param"] == f"hyperparameters.{param}"
    assert api.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing stored


def test_unknown_and_bad_hyperparameters_are_all_named(api: Api) -> None:
    file_id = api.upload()
    hyper = {"bogus_param": 1, "n_epochs": "three", "batch_size": 0}
    body = {
        "model": BASE,
        "training_file": file_id,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
    }
    response = api.create(body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "method.supervised.hyperparameters.bogus_param"
    for text in ("'bogus_param'", "n_epochs='three'", "an integer from 1 to 50", "batch_size=0"):
        assert text in error["message"], error["message"]
    legacy = api.create({"model": BASE, "training_file": file_id, "hyperparameters": {"bogus_param": 1}})
    assert legacy.status_code == 400 and legacy.json()["error"]["param"] == "hyperparameters.bogus_param"
    assert api.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing stored


@pytest.mark.parametrize(
    ("method", "param"),
    [
        ({"type": "supervised", "extra": {}}, "method.extra"),
        ({"type": "supervised", "supervised": {"hyperparameters": {}, "oops": 1}}, "method.supervised.oops"),
        ({"type": "unsupervised"}, "method.type"),
        ({"type": "dpo", "dpo": {}}, "method.type"),
        ({"type": "supervised", "supervised": "fast"}, "method.supervised"),
        ({"type": "supervised", "supervised": {"hyperparameters": [1]}}, "method.supervised.hyperparameters"),
    ],
)
def test_bad_methods_are_named(api: Api, method: dict[str, Any], param: str) -> None:
    response = api.create({"model": BASE, "training_file": api.upload(), "method": method})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_bad_job_requests_get_clear_errors(api: Api) -> None:
    file_id = api.upload()

    def error(body: dict[str, Any], org: str = "acme") -> dict[str, Any]:
        response = api.create(body, org)
        assert response.status_code == 400, response.text
        return response.json()["error"]

    assert error({"model": "gpt-4o", "training_file": file_id})["param"] == "model"
    assert error({"model": BASE, "training_file": "file-nope"})["param"] == "training_file"
    assert error({"model": BASE, "training_file": file_id}, org="globex")["param"] == "training_file"
    assert error({"model": BASE, "training_file": file_id, "validation_file": "file-nope"})["param"] == (
        "validation_file"
    )
    assert error({"model": BASE, "training_file": file_id, "suffix": "a:b"})["param"] == "suffix"
    assert (
        error({"model": BASE, "training_file": file_id, "method": {"type": "dpo"}})["param"] == "method.type"
    )
    assert error({"model": BASE})["param"] == "training_file"
    both = {
        "model": BASE,
        "training_file": file_id,
        "hyperparameters": {"n_epochs": 1},
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    }
    assert error(both)["param"] == "hyperparameters"
    csv = FileRecord(
        id=new_id("file-"),
        tenant="acme",
        filename="r.csv",
        purpose="fine-tune-results",
        bytes=7,
        created_at=1,
        path="files/results-r",
    )
    services_of(api.app).store.files.add(csv)  # as a job's results file is recorded (by the worker)
    wrong = error({"model": BASE, "training_file": csv.id})
    assert wrong["param"] == "training_file" and "purpose" in wrong["message"]
    registry = services_of(api.app).registry
    registry.register_adapter(
        "ft:x:acme::1", base=BASE, tenant="acme", path=Path("/nonexistent"), created=1, preload=False
    )
    assert error({"model": "ft:x:acme::1", "training_file": file_id})["param"] == "model"
    assert api.get("/v1/fine_tuning/jobs").json()["data"] == []


# -- read, cancel --------------------------------------------------------------------------------------------


def test_list_pages_newest_first_and_filters_on_metadata(api: Api) -> None:
    file_id = api.upload()
    # tests/spec.py reads the spec's OpenAPI-3.0 `exclusiveMinimum: true` as "> 1" under JSON Schema 2020-12,
    # so the default multiplier 1.0 would fail validation there; 2.0 sidesteps that validator quirk
    hyper = {"learning_rate_multiplier": 2.0}
    ids = [
        api.create(
            {"model": BASE, "training_file": file_id, "metadata": {"n": str(i)}, "hyperparameters": hyper}
        ).json()["id"]
        for i in range(3)
    ]
    listed = api.get("/v1/fine_tuning/jobs").json()
    validate("ListPaginatedFineTuningJobsResponse", listed)
    assert [j["id"] for j in listed["data"]] == ids[::-1] and listed["has_more"] is False
    page = api.get("/v1/fine_tuning/jobs", limit=2).json()
    assert [j["id"] for j in page["data"]] == ids[:0:-1] and page["has_more"] is True
    rest = api.get("/v1/fine_tuning/jobs", limit=2, after=page["data"][-1]["id"]).json()
    assert [j["id"] for j in rest["data"]] == ids[:1] and rest["has_more"] is False
    assert [j["id"] for j in api.get("/v1/fine_tuning/jobs", **{"metadata[n]": "1"}).json()["data"]] == [
        ids[1]
    ]
    assert api.get("/v1/fine_tuning/jobs", limit=0).json()["error"]["param"] == "limit"
    assert api.get("/v1/fine_tuning/jobs", org="globex").json()["data"] == []


def test_cancel_a_queued_job_then_again(api: Api) -> None:
    body = {
        "model": BASE,
        "training_file": api.upload(),
        "hyperparameters": {"learning_rate_multiplier": 2.0},
    }
    job_id = api.create(body).json()["id"]
    wait_for(lambda: _status(api, job_id) == "queued")
    response = api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=api.headers())
    assert response.status_code == 200, response.text
    validate("FineTuningJob", response.json())
    assert response.json()["status"] == "cancelled" and response.json()["finished_at"] is not None
    again = api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=api.headers())
    assert again.status_code == 400 and "cancelled" in again.json()["error"]["message"]
    events = [e["message"] for e in api.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]]
    assert events[0] == "Fine-tuning job cancelled"
    assert _status(api, job_id) == "cancelled"


def test_events_page_backwards_and_checkpoints_list(api: Api) -> None:
    job_id = api.create({"model": BASE, "training_file": api.upload()}).json()["id"]
    wait_for(lambda: _status(api, job_id) == "queued")
    store = api.store
    for step in (1, 2, 3):
        store.events.add(
            job_id,
            f"Step {step}/3: training loss=1.0",
            type="metrics",
            data={"step": step, "train_loss": 1.0, "tokens_per_second": 100.0},
        )
        store.checkpoints.add(
            CheckpointRecord(
                id=new_id("ftckpt-"),
                job_id=job_id,
                step=step,
                created_at=1,
                metrics={"step": step, "train_loss": 1.0},
                model=f"ft:{BASE}:acme::x:ckpt-step-{step}",
            )
        )
    first = api.get(f"/v1/fine_tuning/jobs/{job_id}/events", limit=2).json()
    assert [e["data"].get("step") for e in first["data"]] == [3, 2] and first["has_more"]
    assert first["data"][0]["type"] == "metrics" and first["data"][0]["level"] == "info"
    older = api.get(f"/v1/fine_tuning/jobs/{job_id}/events", after=first["data"][-1]["id"], limit=100).json()
    assert older["data"][0]["data"]["step"] == 1 and not older["has_more"]
    assert older["data"][-1]["message"].startswith("Created fine-tuning job")
    checkpoints = api.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", limit=2).json()
    validate("ListFineTuningJobCheckpointsResponse", checkpoints)
    assert [c["step_number"] for c in checkpoints["data"]] == [3, 2] and checkpoints["has_more"]
    assert checkpoints["first_id"] == checkpoints["data"][0]["id"]
    assert checkpoints["data"][0]["fine_tuned_model_checkpoint"].endswith(":ckpt-step-3")
    assert checkpoints["data"][0]["metrics"] == {"step": 3.0, "train_loss": 1.0}
    empty = api.get(
        f"/v1/fine_tuning/jobs/{job_id}/checkpoints", after=checkpoints["data"][-1]["id"], limit=5
    ).json()
    assert [c["step_number"] for c in empty["data"]] == [1]


def test_unknown_job_ids_are_404(api: Api) -> None:
    for suffix in ("", "/events", "/checkpoints"):
        response = api.get(f"/v1/fine_tuning/jobs/ftjob-nope{suffix}")
        assert response.status_code == 404 and response.json()["error"]["code"] == "fine_tuning_job_not_found"
    assert api.client.post("/v1/fine_tuning/jobs/ftjob-nope/cancel", headers=api.headers()).status_code == 404


# -- restart and hot-load ------------------------------------------------------------------------------------


def test_jobs_survive_a_restart_and_pending_validation_completes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with running(data) as api:
        file_id = api.upload()
        job_id = api.create({"model": BASE, "training_file": file_id}).json()["id"]
        wait_for(lambda: _status(api, job_id) == "queued")
        api.store.jobs.update(job_id, status="validating_files")  # as if the gateway died mid-validation
    with running(data) as api:
        wait_for(lambda: _status(api, job_id) == "queued")
        assert api.get(f"/v1/files/{file_id}").status_code == 200


def _adapter(data_dir: Path, name: str) -> str:
    path = data_dir / "adapters" / "ftjob-test" / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"weights")
    return str(path.relative_to(data_dir))


def _model_row(
    api: Api,
    model_id: str,
    relative: str,
    *,
    step: int | None = None,
    tenant: str = "acme",
    job_id: str | None = None,
) -> str:
    """A servable model row (and, for a checkpoint, its checkpoints row); returns its job's id."""
    job_id = job_id or api.create({"model": BASE, "training_file": api.upload(tenant)}, tenant).json()["id"]
    if step is not None:
        api.store.checkpoints.add(
            CheckpointRecord(
                id=f"ftckpt-{step}-{job_id[-6:]}",
                job_id=job_id,
                step=step,
                created_at=1,
                metrics={},
                model=model_id,
            )
        )
    api.store.models.add(
        ModelRecord(
            id=model_id,
            tenant=tenant,
            base=BASE,
            job_id=job_id,
            path=relative,
            created_at=int(time.time()),
            step=step,
        )
    )
    return job_id


def test_a_new_fine_tuned_model_is_servable_within_a_few_poll_ticks(api: Api) -> None:
    """The gateway polls every 0.25 s; the bound is loose because CI machines stall (the latency itself is
    measured in bench/)."""
    data = Path(api.settings.data_dir)
    model_id = f"ft:{BASE}:acme:risk:abcd1234"
    _model_row(api, model_id, _adapter(data, "final"))
    started = time.monotonic()
    wait_for(lambda: model_id in [m["id"] for m in api.get("/v1/models").json()["data"]])
    assert api.engine.has_adapter(model_id)  # preloaded: the first chat does not wait for it
    assert time.monotonic() - started < 3.0
    listed = api.get(f"/v1/models/{model_id}").json()
    assert listed["owned_by"] == "acme"
    chat = api.client.post(
        "/v1/chat/completions",
        headers=api.headers(),
        json={"model": model_id, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert chat.status_code == 200 and api.engine.requests[-1].adapter == model_id
    assert model_id not in [m["id"] for m in api.get("/v1/models", org="globex").json()["data"]]


def test_a_model_finished_a_moment_ago_is_usable_before_the_poll_sees_it(api: Api) -> None:
    data = Path(api.settings.data_dir)
    bridge = services_of(api.app).fine_tuned  # the hot-load bridge
    bridge.poll_seconds = 3600.0
    time.sleep(0.5)  # its poll is asleep for an hour now: only the on-demand lookup can find the model
    model_id = f"ft:{BASE}:acme::now12345"
    _model_row(api, model_id, _adapter(data, "final"))
    chat = api.client.post(  # at once: the registry asks the store about an id it does not know yet
        "/v1/chat/completions",
        headers=api.headers(),
        json={"model": model_id, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert chat.status_code == 200, chat.text
    assert api.engine.requests[-1].adapter == model_id
    assert api.get(f"/v1/models/{model_id}", org="globex").status_code == 404  # still the tenant's alone
    missing = api.get(f"/v1/models/ft:{BASE}:acme::nothere1")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_deleting_a_fine_tuned_model_removes_it_and_its_checkpoints_for_good(tmp_path: Path) -> None:
    """Delete means delete: the model, every checkpoint of its job, their rows and their bytes."""
    data = tmp_path / "data"
    model_id = f"ft:{BASE}:acme::abcd1234"
    ckpt = f"{model_id}:ckpt-step-2"
    with running(data) as api:
        job_id = _model_row(api, model_id, _adapter(data, "final"))
        _model_row(api, ckpt, _adapter(data, "ckpt-step-2"), step=2, job_id=job_id)
        wait_for(lambda: api.get(f"/v1/models/{ckpt}").status_code == 200)
        api.get(f"/v1/models/{model_id}")
        assert (
            api.client.post(
                "/v1/chat/completions",
                headers=api.headers(),
                json={"model": ckpt, "messages": [{"role": "user", "content": "hi"}]},
            ).status_code
            == 200
        )
        assert api.engine.has_adapter(ckpt)
        assert api.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
        response = api.client.delete(f"/v1/models/{model_id}", headers=api.headers())
        assert response.status_code == 200 and response.json() == {
            "id": model_id,
            "object": "model",
            "deleted": True,
        }
        for gone in (model_id, ckpt):
            assert api.get(f"/v1/models/{gone}").status_code == 404
            assert api.store.models.get(gone) is None and not api.engine.has_adapter(gone)
        assert not (data / "adapters" / "ftjob-test").exists()  # every byte of both adapters
        assert api.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"] == []
    with running(data) as api:  # after a restart: still gone
        ids = [m["id"] for m in api.get("/v1/models").json()["data"]]
        assert model_id not in ids and ckpt not in ids


def test_deleting_a_checkpoint_removes_only_that_checkpoint(api: Api) -> None:
    data = Path(api.settings.data_dir)
    model_id = f"ft:{BASE}:acme::keep5678"
    ckpt = f"{model_id}:ckpt-step-4"
    job_id = _model_row(api, model_id, _adapter(data, "final"))
    _model_row(api, ckpt, _adapter(data, "ckpt-step-4"), step=4, job_id=job_id)
    wait_for(lambda: api.get(f"/v1/models/{ckpt}").status_code == 200)
    assert api.client.delete(f"/v1/models/{ckpt}", headers=api.headers()).status_code == 200
    assert api.get(f"/v1/models/{ckpt}").status_code == 404
    assert not (data / "adapters" / "ftjob-test" / "ckpt-step-4").exists()
    assert api.get(f"/v1/models/{model_id}").status_code == 200
    assert (data / "adapters" / "ftjob-test" / "final" / "adapter_model.safetensors").is_file()


def test_a_model_deleted_by_another_gateway_stops_answering_here(api: Api) -> None:
    data = Path(api.settings.data_dir)
    model_id = f"ft:{BASE}:acme::other123"
    _model_row(api, model_id, _adapter(data, "final"))
    wait_for(lambda: api.engine.has_adapter(model_id))
    api.store.models.delete(model_id)  # what DELETE /v1/models does on the other gateway
    wait_for(lambda: not api.engine.has_adapter(model_id))
    assert api.get(f"/v1/models/{model_id}").status_code == 404
    chat = api.client.post(
        "/v1/chat/completions",
        headers=api.headers(),
        json={"model": model_id, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert chat.status_code == 404 and chat.json()["error"]["code"] == "model_not_found"


class _ReadingEngine(FakeEngine):
    """Reads the adapter at load time, as the real engine does, to see what it was handed."""

    seen: dict[str, bytes]

    def add_adapter(self, name: str, path: Path) -> None:
        self.seen = {p.name: p.read_bytes() for p in path.iterdir()}
        super().add_adapter(name, path)


def test_encrypted_adapters_reach_the_engine_in_plaintext(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import base64
    import os

    from gateway.core.settings import PrivacySettings
    from gateway.security.encryption import FileCipher

    key = os.urandom(32)
    monkeypatch.setenv("GATEWAY_MASTER_KEY", base64.b64encode(key).decode())
    settings = Settings(
        data_dir=str(tmp_path / "data"),
        limits=LimitSettings(requests_per_minute=0),
        privacy=PrivacySettings(encrypt_at_rest=True),
    )
    ensure_dev_keys(settings)
    engine = _ReadingEngine()
    app = create_app(settings, engines={BASE: engine})
    with TestClient(app) as client:
        api = Api(client, settings, engine, app)
        data = Path(settings.data_dir)
        relative = _adapter(data, "final")
        FileCipher(key).encrypt_tree(data / relative)
        assert (data / relative / "adapter_model.safetensors").read_bytes().startswith(b"PGWENC")
        model_id = f"ft:{BASE}:acme::enc12345"
        _model_row(api, model_id, relative)
        wait_for(lambda: engine.has_adapter(model_id))
        assert engine.seen == {"adapter_config.json": b"{}", "adapter_model.safetensors": b"weights"}
        # The plaintext copy is gone again: removed just after add_adapter returns, and has_adapter turns
        # true inside it, so wait rather than race the bridge's cleanup.
        wait_for(lambda: not any((data / "tmp").glob("adapter-*")))
