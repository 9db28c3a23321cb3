"""The Files API on the real app (create_app with a fake engine): upload, validation, limits, list, content,
delete, tenancy, encryption at rest.  Shapes are checked against the OpenAI spec."""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.auth.keys import ensure_dev_keys
from gateway.auth.tokens import mint_dev_token
from gateway.core.settings import LimitSettings, PrivacySettings, Settings
from tests.spec import validate
from tests.unit.fake_engine import FakeEngine
from tests.unit.training_files import chat_jsonl

BASE = "smollm2-135m-instruct"
SCOPES = "models:read chat files:read files:write fine_tuning:read fine_tuning:write"
ALPACA_ROWS = [
    {"instruction": "分析客户风险等级", "input": f"客户年龄{30 + i}岁,年收入{20 + i}万", "output": "低风险"}
    for i in range(6)
]
ALPACA_JSON = json.dumps(ALPACA_ROWS, ensure_ascii=False).encode()
ALPACA_JSONL = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in ALPACA_ROWS)
CHAT_JSONL = chat_jsonl(5)


@dataclass
class Api:
    client: TestClient[Any]
    settings: Settings

    def headers(self, org: str = "acme", scope: str = SCOPES) -> dict[str, str]:
        token = mint_dev_token(self.settings, sub=f"u-{org}", org=org, scope=scope, ttl_seconds=600)
        return {"Authorization": f"Bearer {token}"}

    def upload(
        self,
        content: bytes,
        *,
        name: str = "train.jsonl",
        purpose: str | None = "fine-tune",
        org: str = "acme",
    ) -> Any:
        data = {"purpose": purpose} if purpose is not None else {}
        return self.client.post(
            "/v1/files",
            files={"file": (name, content, "application/octet-stream")},
            data=data,
            headers=self.headers(org),
        )

    @property
    def data_dir(self) -> Path:
        return Path(self.settings.data_dir)

    def stored_bodies(self) -> list[Path]:
        files = self.data_dir / "files"
        return [p for p in files.iterdir()] if files.is_dir() else []

    def staged(self) -> list[Path]:
        tmp = self.data_dir / "tmp"
        return [p for p in tmp.iterdir()] if tmp.is_dir() else []


def _api(tmp_path: Path, **settings: Any) -> Iterator[Api]:
    config = Settings(
        data_dir=str(tmp_path / "data"),
        limits=LimitSettings(requests_per_minute=0, **settings.pop("limits", {})),
        **settings,
    )
    ensure_dev_keys(config)
    with TestClient(create_app(config, engines={BASE: FakeEngine()})) as client:
        yield Api(client, config)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from _api(tmp_path)


@pytest.mark.parametrize(
    ("name", "content"),
    [("alpaca.json", ALPACA_JSON), ("alpaca.jsonl", ALPACA_JSONL), ("chat.jsonl", CHAT_JSONL)],
)
def test_upload_accepts_both_training_formats(api: Api, name: str, content: bytes) -> None:
    response = api.upload(content, name=name)
    assert response.status_code == 200, response.text
    body = response.json()
    validate("OpenAIFile", body)
    assert body["object"] == "file" and body["purpose"] == "fine-tune" and body["filename"] == name
    assert body["bytes"] == len(content) and body["id"].startswith("file-") and body["status"] == "processed"
    stored = api.data_dir / "files" / body["id"]
    assert stored.read_bytes() == content
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert stat.S_IMODE(stored.parent.stat().st_mode) == 0o700
    assert api.client.get(f"/v1/files/{body['id']}/content", headers=api.headers()).content == content
    assert api.staged() == []


def test_an_invalid_file_names_the_line_and_stores_nothing(api: Api) -> None:
    bad = ALPACA_JSONL + b'{"instruction": "x"\n' + ALPACA_JSONL
    response = api.upload(bad)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "file"
    assert "line 7" in error["message"], error["message"]
    missing_output = ALPACA_JSONL + json.dumps({"instruction": "x", "input": "y"}).encode() + b"\n"
    message = api.upload(missing_output).json()["error"]["message"]
    assert "line 7" in message and "output" in message, message
    assert api.client.get("/v1/files", headers=api.headers()).json()["data"] == []
    assert api.stored_bodies() == [] and api.staged() == []


def test_bad_requests_get_openai_errors(api: Api) -> None:
    wrong = api.upload(ALPACA_JSONL, purpose="assistants")
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "purpose"
    missing = api.upload(ALPACA_JSONL, purpose=None)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "purpose"
    no_file = api.client.post(
        "/v1/files", data={"purpose": "fine-tune"}, headers=api.headers(), files={"other": ("x", b"y")}
    )
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    not_form = api.client.post("/v1/files", json={"purpose": "fine-tune"}, headers=api.headers())
    assert not_form.status_code == 400 and "multipart/form-data" in not_form.json()["error"]["message"]
    empty = api.upload(b"")
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "file"
    cut = api.client.post(
        "/v1/files",
        headers={**api.headers(), "Content-Type": "multipart/form-data; boundary=xyz"},
        content=b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n{"a"',
    )
    assert cut.status_code == 400, cut.text
    read_only = api.client.post(
        "/v1/files",
        files={"file": ("a.jsonl", ALPACA_JSONL)},
        data={"purpose": "fine-tune"},
        headers=api.headers(scope="files:read"),
    )
    assert read_only.status_code == 403
    assert api.stored_bodies() == [] and api.staged() == []


def test_too_large_is_413_and_leaves_nothing(tmp_path: Path) -> None:
    for api in _api(tmp_path, limits={"max_upload_bytes": 200}):
        big = ALPACA_JSONL * 3
        assert len(big) > 200
        response = api.upload(big)
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "payload_too_large"
        assert api.stored_bodies() == [] and api.staged() == []
        assert api.upload(ALPACA_JSONL[:150].rsplit(b"\n", 2)[0] + b"\n").status_code == 200  # under it: fine


def test_a_chunked_body_past_the_limit_is_413_whatever_part_it_is_in(tmp_path: Path) -> None:
    """No Content-Length: a preamble (before the first boundary) of 1 MiB is counted like the file itself."""
    for api in _api(tmp_path, limits={"max_upload_bytes": 200}):

        def chunks() -> Iterator[bytes]:
            for _ in range(16):
                yield b"x" * 65536
            yield b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n--B--\r\n'

        headers = {**api.headers(), "Content-Type": "multipart/form-data; boundary=B"}
        response = api.client.post("/v1/files", content=chunks(), headers=headers)
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "payload_too_large"
        assert api.stored_bodies() == [] and api.staged() == []


def test_list_pages_orders_and_filters(api: Api) -> None:
    ids = [api.upload(ALPACA_JSONL).json()["id"] for _ in range(3)]
    listed = api.client.get("/v1/files", headers=api.headers()).json()
    validate("ListFilesResponse", listed)
    assert [f["id"] for f in listed["data"]] == ids[::-1] and listed["has_more"] is False
    assert listed["first_id"] == ids[2] and listed["last_id"] == ids[0]
    page = api.client.get("/v1/files", params={"limit": 2, "order": "asc"}, headers=api.headers()).json()
    assert [f["id"] for f in page["data"]] == ids[:2] and page["has_more"] is True
    rest = api.client.get(
        "/v1/files", params={"after": page["last_id"], "order": "asc"}, headers=api.headers()
    )
    assert [f["id"] for f in rest.json()["data"]] == ids[2:]
    assert (
        api.client.get("/v1/files", params={"purpose": "fine-tune-results"}, headers=api.headers()).json()[
            "data"
        ]
        == []
    )
    bad = api.client.get("/v1/files", params={"limit": 0}, headers=api.headers())
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"
    bad = api.client.get("/v1/files", params={"order": "sideways"}, headers=api.headers())
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "order"
    empty = api.client.get("/v1/files", headers=api.headers("globex")).json()
    validate("ListFilesResponse", empty)


def test_retrieve_and_delete(api: Api) -> None:
    file_id = api.upload(ALPACA_JSONL).json()["id"]
    retrieved = api.client.get(f"/v1/files/{file_id}", headers=api.headers())
    validate("OpenAIFile", retrieved.json())
    deleted = api.client.delete(f"/v1/files/{file_id}", headers=api.headers())
    assert deleted.status_code == 200
    validate("DeleteFileResponse", deleted.json())
    assert deleted.json() == {"id": file_id, "object": "file", "deleted": True}
    assert not (api.data_dir / "files" / file_id).exists()
    for method, path in (
        ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}/content"),
        ("DELETE", f"/v1/files/{file_id}"),
    ):
        gone = api.client.request(method, path, headers=api.headers())
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "file_not_found"


def test_a_file_in_use_by_an_active_job_cannot_be_deleted(api: Api) -> None:
    file_id = api.upload(ALPACA_JSONL).json()["id"]
    job = api.client.post(
        "/v1/fine_tuning/jobs", json={"model": BASE, "training_file": file_id}, headers=api.headers()
    )
    assert job.status_code == 200, job.text
    refused = api.client.delete(f"/v1/files/{file_id}", headers=api.headers())
    assert refused.status_code == 409 and job.json()["id"] in refused.json()["error"]["message"]
    assert api.client.get(f"/v1/files/{file_id}", headers=api.headers()).status_code == 200
    api.client.post(f"/v1/fine_tuning/jobs/{job.json()['id']}/cancel", headers=api.headers())
    assert api.client.delete(f"/v1/files/{file_id}", headers=api.headers()).status_code == 200


def test_files_are_encrypted_at_rest_when_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())
    for api in _api(tmp_path, privacy=PrivacySettings(encrypt_at_rest=True)):
        file_id = api.upload(ALPACA_JSONL).json()["id"]
        stored = (api.data_dir / "files" / file_id).read_bytes()
        assert "分析客户风险等级".encode() not in stored and stored.startswith(b"PGWENC")
        assert api.client.get(f"/v1/files/{file_id}/content", headers=api.headers()).content == ALPACA_JSONL
        assert api.staged() == []


def test_start_up_sweeps_what_a_crash_left_behind(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for api in _api(tmp_path):
        kept = api.upload(ALPACA_JSONL).json()["id"]
    old = time.time() - 7200
    leftovers = [data / "tmp" / "upload-cut", data / "files" / "file-orphan", data / "tmp" / "adapter-x"]
    leftovers[0].write_bytes(b"half an upload")
    leftovers[1].write_bytes(b"a body whose record never got written")
    leftovers[2].mkdir()
    (leftovers[2] / "adapter_model.safetensors").write_bytes(b"plaintext weights")
    fresh = data / "tmp" / "upload-in-progress"
    fresh.write_bytes(b"another process is writing this right now")
    for path in leftovers:
        os.utime(path, (old, old))
    for api in _api(tmp_path):
        assert not any(path.exists() for path in leftovers)
        assert fresh.exists()  # too young to be a crash's leftover
        assert api.client.get(f"/v1/files/{kept}/content", headers=api.headers()).content == ALPACA_JSONL


def test_a_record_over_the_size_cap_is_a_400_and_nothing_is_kept(tmp_path: Path) -> None:
    from gateway.core.settings import FinetuneSettings

    for api in _api(tmp_path, finetune=FinetuneSettings(run_worker=False, max_record_bytes=2048)):
        big = json.dumps({"instruction": "x" * 4096, "output": "y"}).encode() + b"\n"
        response = api.upload(ALPACA_JSONL + big)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        validate("ErrorResponse", response.json())
        assert (error["param"], error["code"]) == ("file", "invalid_file_format")
        assert "longer than 2048 bytes" in error["message"]
        assert api.stored_bodies() == [] and api.staged() == []
        assert api.upload(ALPACA_JSONL).status_code == 200  # records under the cap still go in


def test_uploads_are_validated_on_their_own_thread(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from contracts import training_data

    seen: list[str] = []
    real = training_data.validate_file

    def spying(*args: Any, **kw: Any) -> Any:
        seen.append(threading.current_thread().name)
        return real(*args, **kw)

    monkeypatch.setattr(training_data, "validate_file", spying)
    assert api.upload(ALPACA_JSONL).status_code == 200
    assert len(seen) == 1 and seen[0].startswith("validate-upload")


def test_tmp_is_swept_periodically_of_what_is_older_than_the_age(tmp_path: Path) -> None:
    privacy = PrivacySettings(tmp_sweep_seconds=0.2, tmp_max_age_seconds=60, block_egress=False)
    data = tmp_path / "data"
    for api in _api(tmp_path, privacy=privacy):
        (data / "tmp").mkdir(parents=True, exist_ok=True)
        stale, young = data / "tmp" / "upload-stale", data / "tmp" / "upload-young"
        stale.write_bytes(b"plaintext left by a request that died")
        young.write_bytes(b"an upload arriving now")
        old = time.time() - 120  # past the 60 s age, but far younger than the hour the start-up sweep used
        os.utime(stale, (old, old))
        deadline = time.monotonic() + 10
        while stale.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not stale.exists() and young.exists()
        assert api.upload(ALPACA_JSONL).status_code == 200
