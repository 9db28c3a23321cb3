"""/readyz and the process's fate through the real app: an engine that gave up turns the gateway unready and
asks `gateway serve` to exit (so systemd or the container runtime restarts it); a supervised fine-tuning
worker's state is reported."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from litestar.testing import TestClient

from gateway.app import create_app
from gateway.auth.keys import ensure_dev_keys
from gateway.core.settings import Settings
from gateway.core.worker_supervisor import WorkerSupervisor
from tests.unit.fake_engine import FakeEngine

MODEL = "smollm2-135m-instruct"


class GivingUpEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__(MODEL)
        self.failed = False

    def is_ready(self) -> bool:
        return not self.failed

    def is_failed(self) -> bool:
        return self.failed


def _settings(tmp_path: Path) -> Settings:
    settings = Settings(data_dir=str(tmp_path / "data"))
    ensure_dev_keys(settings)
    return settings


def _wait(condition: Any) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_an_engine_that_gave_up_makes_the_gateway_unready_and_asks_it_to_exit(tmp_path: Path) -> None:
    engine = GivingUpEngine()
    asked = threading.Event()
    app = create_app(_settings(tmp_path), engines={MODEL: engine}, on_engine_failed=asked.set)
    with TestClient(app) as client:
        assert client.get("/readyz").json()["engine"] is True
        engine.failed = True
        assert asked.wait(10)
        response = client.get("/readyz")
        assert response.status_code == 503 and response.json()["engine"] is False


def test_readyz_reports_the_worker_and_chat_readiness_does_not_depend_on_it(tmp_path: Path) -> None:
    worker = WorkerSupervisor([sys.executable, "-c", "import time; time.sleep(120)"], backoff_seconds=30)
    app = create_app(_settings(tmp_path), engines={MODEL: FakeEngine(MODEL)}, worker=worker)
    with TestClient(app) as client:
        _wait(lambda: client.get("/readyz").json().get("worker") is True)
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        _wait(lambda: client.get("/readyz").json().get("worker") is False)
        response = client.get("/readyz")
        assert response.status_code == 200 and response.json()["engine"] is True


def test_readyz_has_no_worker_field_when_this_gateway_runs_none(tmp_path: Path) -> None:
    with TestClient(create_app(_settings(tmp_path), engines={MODEL: FakeEngine(MODEL)})) as client:
        assert "worker" not in client.get("/readyz").json()
