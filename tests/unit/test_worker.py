"""The fine-tuning worker's own logic with a scripted trainer (no torch): claim, events, checkpoints and
models, success/failure/cancel, shutdown hand-back and resume, lost leases and the attempt limit."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from contracts.blobs import BlobStorage
from contracts.hyperparameters import resolve
from finetune.config import InvalidSetting
from finetune.worker import MAX_ATTEMPTS, Worker, _run_until_signalled
from gateway.core.settings import FinetuneSettings, ModelSettings, PrivacySettings, Settings
from gateway.security.encryption import FileCipher
from gateway.store import FileRecord, JobRecord, Store, new_id
from tests.unit.tiny_models import tiny_llama_config

BASE = "tiny"
ADAPTER = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b"weights"}


class TrainingCancelled(Exception):
    pass


class FakeTrainConfig:
    """Keeps what the worker passes (finetune.trainer.TrainConfig's fields)."""

    def __init__(self, **kw: Any) -> None:
        self.output_dir: Path = kw["output_dir"]
        self.save_steps: int = kw["save_steps"]
        self.kwargs = kw


class ScriptedTrainer:
    """finetune.trainer's interface, scripted: steps 1..steps, a checkpoint every `save_steps` (and at the
    last) in output_dir/checkpoints/step-N, resuming after the latest one there."""

    TrainConfig = FakeTrainConfig
    TrainingCancelled = TrainingCancelled
    InvalidSetting = InvalidSetting

    def __init__(
        self,
        steps: int = 6,
        *,
        delay: float = 0.0,
        fail_at: int | None = None,
        error: Exception | None = None,
        on_step: Callable[[int], object] | None = None,
    ) -> None:
        self.steps, self.delay, self.fail_at, self.on_step = steps, delay, fail_at, on_step
        self.error = error or RuntimeError("CUDA error: an illegal memory access was encountered")
        self.configs: list[FakeTrainConfig] = []
        self.started_at: list[int] = []
        self.data: list[bytes] = []
        self.sealers: list[Any] = []

    def train(
        self,
        config: FakeTrainConfig,
        on_event: Callable[[str, str, dict[str, Any]], None],
        should_stop: Callable[[], bool],
        *,
        sealer: Any = None,
    ) -> Any:
        """`sealer`: as the real trainer, every adapter file goes through it (the csv once, at the end)."""
        self.configs.append(config)
        self.sealers.append(sealer)
        self.data.append(config.kwargs["training_file"].read_bytes())
        done = sorted(int(p.name.split("-")[-1]) for p in (config.output_dir / "checkpoints").glob("step-*"))
        resumed = done[-1] if done else 0
        self.started_at.append(resumed + 1)
        on_event(
            "started",
            f"Fine-tuning started: 4 examples, {self.steps} steps",
            {"total_steps": self.steps, "resumed_from_step": resumed},
        )
        config.output_dir.mkdir(parents=True, exist_ok=True)
        csv = config.output_dir / "metrics.csv"
        if not csv.exists():
            csv.write_text("step,train_loss,valid_loss,learning_rate,tokens_per_second\n")
        for step in range(resumed + 1, self.steps + 1):
            if should_stop():
                raise TrainingCancelled(f"cancelled at step {step - 1}")
            if self.on_step:
                self.on_step(step)
            if step == self.fail_at:
                raise self.error
            time.sleep(self.delay)
            loss = 2.0 / step
            on_event(
                "metrics",
                f"Step {step}/{self.steps}: training loss={loss:.4f}",
                {
                    "step": step,
                    "train_loss": loss,
                    "learning_rate": 1e-3,
                    "tokens_per_second": 50.0,
                    "total_steps": self.steps,
                    "trained_tokens": 10 * step,
                },
            )
            with csv.open("a") as fh:
                fh.write(f"{step},{loss},,0.001,50.0\n")
            if step == self.steps or (config.save_steps and step % config.save_steps == 0):
                path = _write_adapter(config.output_dir / "checkpoints" / f"step-{step}", sealer)
                on_event("checkpoint", f"Checkpoint saved at step {step}", {"step": step, "path": str(path)})
        final = _write_adapter(config.output_dir / "adapter", sealer)
        if sealer is not None:
            sealer.encrypt_stream([csv.read_bytes()], csv)
        return SimpleNamespace(
            adapter_dir=final, trained_tokens=10 * self.steps, metrics_csv=csv, steps=self.steps
        )


def _write_adapter(path: Path, sealer: Any = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, content in ADAPTER.items():
        if sealer is None:
            (path / name).write_bytes(content)
        else:
            sealer.encrypt_stream([content], path / name)
    return path


@dataclass
class Setup:
    settings: Settings
    store: Store
    blobs: BlobStorage

    @property
    def data(self) -> Path:
        return self.settings.data_path

    def job(self, *, save_steps: int = 2, tenant: str = "acme") -> JobRecord:
        rows = b'{"instruction": "a", "output": "b"}\n' * 4
        plain = self.data / "upload.jsonl"
        plain.write_bytes(rows)
        file_id = new_id("file-")
        record = FileRecord(
            id=file_id,
            tenant=tenant,
            filename="t.jsonl",
            purpose="fine-tune",
            bytes=len(rows),
            created_at=1,
            path=f"files/{file_id}",
            rows=4,
            format="alpaca",
        )
        self.blobs.put(plain, record.path)
        self.store.files.add(record)
        job = JobRecord(
            id=new_id("ftjob-"),
            tenant=tenant,
            subject="alice",
            model=BASE,
            training_file=file_id,
            seed=3,
            hyperparameters=resolve({"save_steps": save_steps}, rows=4),
            status="queued",
            created_at=int(time.time()),
            suffix="risk",
        )
        return self.store.jobs.add(job)

    def worker(self, trainer: ScriptedTrainer, **kw: Any) -> Worker:
        return Worker(self.settings, store=self.store, trainer=trainer, heartbeat_seconds=0.05, **kw)

    def events(self, job_id: str) -> list[str]:
        return [e.message for e in reversed(self.store.events.list_page(job_id, limit=1000).items)]


def _job(setup: Setup, job_id: str) -> JobRecord:
    job = setup.store.jobs.get(job_id)
    assert job is not None
    return job


def _setup(tmp_path: Path, **settings: Any) -> Setup:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    config = Settings(
        data_dir=str(tmp_path / "data"),
        models=ModelSettings(default=BASE, base={BASE: str(model)}),
        finetune=FinetuneSettings(poll_seconds=0.05),
        **settings,
    )
    store = Store.open(config.data_path)
    from gateway.security.master_key import cipher_from_settings

    return Setup(config, store, BlobStorage(cipher_from_settings(config), config.data_path))


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = _setup(tmp_path)
    yield s
    s.store.close()


def test_a_job_runs_to_success(setup: Setup) -> None:
    job = setup.job()
    trainer = ScriptedTrainer(steps=5)
    worker = setup.worker(trainer)
    assert worker.run_once() and not worker.run_once()
    done = setup.store.jobs.get(job.id)
    assert done is not None and done.status == "succeeded", done
    name = f"ft:{BASE}:acme:risk:{job.id[-8:]}"
    assert done.fine_tuned_model == name and done.trained_tokens == 50 and done.finished_at is not None
    assert done.estimated_finish is None and done.error is None
    config = trainer.configs[0]
    assert config.kwargs["learning_rate"] == 2e-4  # the default rate times the default multiplier, 1
    assert (
        config.kwargs["keep_checkpoints"] == 2
    )  # finetune.keep_checkpoints: the disk a job holds is bounded
    assert config.kwargs["target_modules"] == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    assert config.kwargs["seed"] == 3 and trainer.data[0].startswith(b'{"instruction"')
    messages = setup.events(job.id)
    assert messages[:2] == ["Fine-tuning job started", "Fine-tuning started: 4 examples, 5 steps"]
    assert [m for m in messages if m.startswith("Step")][:2] == [
        "Step 1/5: training loss=2.0000",
        "Step 2/5: training loss=1.0000",
    ]
    assert "Checkpoint created at step 2" in messages and "Checkpoint created at step 4" in messages
    assert messages[-2:] == [f"New fine-tuned model created: {name}", "The job has successfully completed"]
    metrics = [e for e in setup.store.events.list_page(job.id, limit=100).items if e.type == "metrics"]
    assert len(metrics) == 5 and metrics[0].data is not None and metrics[0].data["tokens_per_second"] == 50.0
    models = {m.id: m for m in setup.store.models.since(0)}
    # finetune.keep_checkpoints = 2: the export at step 2 went, rows and files, once step 5's was there
    assert set(models) == {name, *(f"{name}:ckpt-step-{n}" for n in (4, 5))}
    assert sorted(p.name for p in (setup.data / "adapters" / job.id).iterdir()) == [
        "ckpt-step-4",
        "ckpt-step-5",
        "final",
    ]
    for model in models.values():
        files = {p.name: p.read_bytes() for p in (setup.data / model.path).iterdir()}
        assert files == ADAPTER
    # exported once: the final adapter's files are the last checkpoint's (hard links, no second copy)
    final_dir, last_dir = setup.data / models[name].path, setup.data / models[f"{name}:ckpt-step-5"].path
    for filename in ADAPTER:
        assert (final_dir / filename).stat().st_ino == (last_dir / filename).stat().st_ino
    checkpoints = setup.store.checkpoints.list_page(job.id).items
    assert [c.step for c in checkpoints] == [5, 4]  # the list agrees with the files
    assert checkpoints[1].metrics == {"step": 4, "train_loss": 0.5}  # the step's loss, logged just before
    results = setup.store.files.get(done.result_files[0], "acme")
    assert results is not None and results.purpose == "fine-tune-results"
    csv = b"".join(setup.blobs.chunks(results.path)).decode().splitlines()
    assert csv[0] == "step,train_loss,valid_loss,learning_rate,tokens_per_second" and len(csv) == 6
    assert not (setup.data / "work" / job.id).exists()  # the private work dir is gone


def test_a_training_error_fails_the_job_with_its_type(setup: Setup) -> None:
    job = setup.job()
    setup.worker(ScriptedTrainer(steps=5, fail_at=3)).run_once()
    failed = setup.store.jobs.get(job.id)
    assert failed is not None and failed.status == "failed" and failed.error is not None
    assert failed.error["code"] == "training_failed"
    assert (
        "RuntimeError" in failed.error["message"] and "illegal memory access" not in failed.error["message"]
    )
    assert setup.events(job.id)[-1].startswith("Fine-tuning job failed")
    assert [m.step for m in setup.store.models.since(0)] == [
        2
    ]  # the checkpoint before the error stays usable
    assert not (setup.data / "work" / job.id).exists()


@pytest.mark.parametrize(
    ("error", "code", "param", "text"),
    [
        (
            InvalidSetting("max_seq_length", "max_seq_length=16: no example fits"),
            "invalid_training_setup",
            "hyperparameters.max_seq_length",
            "max_seq_length=16",
        ),
        (
            InvalidSetting(
                "training_file", "training_file: no example has an assistant token within max_seq_length"
            ),
            "invalid_training_setup",
            "training_file",
            "assistant token",
        ),
        (__import__("torch").OutOfMemoryError("CUDA out of memory"), "out_of_memory", None, "batch_size"),
    ],
)
def test_trainer_errors_become_actionable_job_errors(
    setup: Setup, error: Exception, code: str, param: str | None, text: str
) -> None:
    job = setup.job()
    setup.worker(ScriptedTrainer(steps=3, fail_at=1, error=error)).run_once()
    failed = _job(setup, job.id)
    assert failed.status == "failed" and failed.error is not None
    assert (failed.error["code"], failed.error["param"]) == (code, param) and text in failed.error["message"]


def test_the_plaintext_data_copy_goes_once_training_has_read_it(setup: Setup) -> None:
    job = setup.job()
    data_dir = setup.data / "work" / job.id / "data"
    seen: list[bool] = []
    trainer = ScriptedTrainer(steps=3, on_step=lambda step: seen.append(data_dir.exists()))
    setup.worker(trainer).run_once()
    assert trainer.data and trainer.data[0]  # the trainer read the file before it went
    assert seen == [False, False, False]  # gone for the whole run, not only at its end
    assert _job(setup, job.id).status == "succeeded"


def test_an_unexpected_error_shows_its_type_never_its_text(setup: Setup) -> None:
    job = setup.job()
    secret = "row 17: my card number is 4111 1111 1111 1111 at /srv/data/work/x"
    setup.worker(ScriptedTrainer(steps=3, fail_at=1, error=KeyError(secret))).run_once()
    failed = _job(setup, job.id)
    assert failed.status == "failed" and failed.error is not None
    message = failed.error["message"]
    assert "KeyError" in message and "internal error" in message
    assert "4111" not in message and "/srv" not in message and "row 17" not in message


def test_an_unknown_base_model_fails_with_a_clear_error(setup: Setup) -> None:
    job = setup.job()
    setup.store.jobs.update(job.id, model="other-model")
    setup.worker(ScriptedTrainer()).run_once()
    failed = setup.store.jobs.get(job.id)
    assert failed is not None and failed.error is not None and failed.error["param"] == "model"
    assert "other-model" in failed.error["message"]


def test_cancel_stops_training_within_a_heartbeat(setup: Setup) -> None:
    job = setup.job()
    cancel_at: list[float] = []

    def cancel(step: int) -> None:
        if step == 3:
            setup.store.jobs.update(job.id, status_in=("running",), status="cancelled")
            cancel_at.append(time.monotonic())

    worker = setup.worker(ScriptedTrainer(steps=1000, delay=0.01, on_step=cancel))
    worker.run_once()
    assert time.monotonic() - cancel_at[0] < 5.0  # heartbeats every 0.05 s; loose for stalled CI machines
    cancelled = setup.store.jobs.get(job.id)
    assert cancelled is not None and cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    assert setup.events(job.id)[-1] == "Training stopped; the job was cancelled"
    assert all(m.step is not None for m in setup.store.models.since(0))  # no final model
    assert not (setup.data / "work" / job.id).exists()


def test_shutdown_hands_the_job_back_and_a_new_worker_resumes_it(setup: Setup) -> None:
    job = setup.job(save_steps=2)

    def stop_at_step_4(step: int) -> None:
        if step == 4:
            first.shutdown.set()  # as SIGTERM does

    first = setup.worker(ScriptedTrainer(steps=6, on_step=stop_at_step_4), worker_id="w1")
    first.run_once()
    back = setup.store.jobs.get(job.id)
    assert back is not None and back.status == "queued" and back.attempts == 0
    assert (setup.data / "work" / job.id / "trainer" / "checkpoints" / "step-4").is_dir()  # kept to resume
    assert not (setup.data / "work" / job.id / "data").exists()  # but not the plaintext training data
    assert "will resume" in setup.events(job.id)[-1]
    resumed = ScriptedTrainer(steps=6)
    setup.worker(resumed, worker_id="w2").run_once()
    assert resumed.started_at == [5]  # after the latest complete checkpoint
    done = setup.store.jobs.get(job.id)
    assert done is not None and done.status == "succeeded"
    assert [c.step for c in setup.store.checkpoints.list_page(job.id).items] == [6, 4]  # keep_checkpoints


def test_a_dead_workers_job_is_taken_over_after_its_lease(setup: Setup) -> None:
    job = setup.job()
    setup.store.jobs.claim("dead-host-0", now=time.time() - 60, lease_seconds=30)  # lease ran out 30 s ago
    _write_adapter(setup.data / "work" / job.id / "trainer" / "checkpoints" / "step-4")
    trainer = ScriptedTrainer(steps=6)
    setup.worker(trainer, worker_id="w2").run_once()
    assert trainer.started_at == [5]
    done = setup.store.jobs.get(job.id)
    assert done is not None and done.status == "succeeded" and done.attempts == 2
    assert "Resuming fine-tuning job (attempt 2)" in setup.events(job.id)[0]


def test_a_job_interrupted_too_often_fails(setup: Setup) -> None:
    job = setup.job()
    for _ in range(MAX_ATTEMPTS):
        setup.store.jobs.claim(
            "crashy-0", now=time.time(), lease_seconds=30
        )  # each claim by a worker that died
    trainer = ScriptedTrainer()
    setup.worker(trainer, worker_id="crashy-0").run_once()
    failed = setup.store.jobs.get(job.id)
    assert failed is not None and failed.status == "failed" and failed.error is not None
    assert failed.error["code"] == "worker_interrupted" and "3 times" in failed.error["message"]
    assert trainer.configs == []


def test_the_heartbeat_renews_the_lease_and_reports_an_estimate(setup: Setup) -> None:
    job = setup.job(save_steps=0)
    seen: list[JobRecord] = []

    def look(step: int) -> None:
        if step == 15:
            seen.append(_job(setup, job.id))

    trainer = ScriptedTrainer(steps=20, delay=0.03, on_step=look)
    setup.worker(trainer, lease_seconds=5).run_once()
    mid = seen[0]
    assert mid.status == "running" and mid.lease_until is not None and mid.lease_until > time.time() + 3
    assert mid.estimated_finish is not None and mid.estimated_finish >= int(time.time()) - 1


def test_two_workers_never_run_the_same_job(tmp_path: Path) -> None:
    setup = _setup(tmp_path)
    ids = {setup.job().id for _ in range(6)}
    ran: dict[str, list[str]] = {"a": [], "b": []}

    def work(name: str) -> None:
        own = Store.open(setup.data)  # a separate connection, as a second process would have
        trainer = ScriptedTrainer(steps=2, delay=0.01)
        worker = Worker(setup.settings, store=own, trainer=trainer, worker_id=name, heartbeat_seconds=0.05)
        while worker.run_once():
            ran[name].append(str(trainer.configs[-1].kwargs["training_file"].parent.parent.name))
        own.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in ran]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ran["a"] + ran["b"]) == sorted(ids)
    assert all(setup.store.jobs.get(i).status == "succeeded" for i in ids)  # type: ignore[union-attr]


def test_adapters_and_training_data_are_encrypted_at_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = os.urandom(32)
    monkeypatch.setenv("GATEWAY_MASTER_KEY", base64.b64encode(key).decode())
    setup = _setup(tmp_path, privacy=PrivacySettings(encrypt_at_rest=True))
    job = setup.job()
    assert (setup.data / "files" / job.training_file).read_bytes().startswith(b"PGWENC")
    trainer = ScriptedTrainer(steps=2)
    setup.worker(trainer).run_once()
    assert trainer.data[0].startswith(b'{"instruction"')  # the trainer got plaintext
    final = setup.store.models.get(f"ft:{BASE}:acme:risk:{job.id[-8:]}")
    assert final is not None
    weights = (setup.data / final.path / "adapter_model.safetensors").read_bytes()
    assert weights.startswith(b"PGWENC") and b"weights" not in weights
    plain = tmp_path / "plain"
    FileCipher(key).decrypt_tree(setup.data / final.path, plain)
    assert (plain / "adapter_model.safetensors").read_bytes() == b"weights"
    result = setup.store.files.get(setup.store.jobs.get(job.id).result_files[0], None)  # type: ignore[union-attr]
    assert result is not None and (setup.data / result.path).read_bytes().startswith(b"PGWENC")


def test_a_handed_back_job_leaves_only_sealed_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())
    setup = _setup(tmp_path, privacy=PrivacySettings(encrypt_at_rest=True))
    job = setup.job(save_steps=2)

    def stop_at_step_4(step: int) -> None:
        if step == 4:
            worker.shutdown.set()  # as SIGTERM does

    trainer = ScriptedTrainer(steps=6, on_step=stop_at_step_4)
    worker = setup.worker(trainer, worker_id="w1")
    worker.run_once()
    assert trainer.sealers == [worker.cipher]  # the trainer seals with the data dir's cipher
    work = setup.data / "work" / job.id
    assert not (work / "data").exists()  # the decrypted training data is gone
    kept = [p for p in work.rglob("*") if p.is_file() and p.name != "metrics.csv"]  # the fake's csv is plain
    assert kept and all(p.read_bytes().startswith(b"PGWENC") for p in kept)
    # the exports are the trainer's sealed files, hard-linked: no plaintext and no second copy
    export = setup.data / "adapters" / job.id / "ckpt-step-4" / "adapter_model.safetensors"
    sealed = work / "trainer" / "checkpoints" / "step-4" / "adapter_model.safetensors"
    assert export.stat().st_ino == sealed.stat().st_ino and b"weights" not in export.read_bytes()
    setup.worker(ScriptedTrainer(steps=6), worker_id="w2").run_once()
    assert _job(setup, job.id).status == "succeeded" and not work.exists()
    setup.store.close()


def test_the_start_sweep_removes_plaintext_and_orphaned_exports(setup: Setup) -> None:
    queued = setup.job()
    data = setup.data / "work" / queued.id / "data"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("left by a kill -9")
    os.utime(
        data, (time.time() - 120, time.time() - 120)
    )  # a fresh one may be another worker's, just claimed
    orphan = setup.data / "adapters" / queued.id / "ckpt-step-9"  # its row went, its files did not
    staging = setup.data / "adapters" / queued.id / ".ckpt-step-10-x"
    fresh = setup.data / "adapters" / queued.id / "ckpt-step-11"  # maybe between rename and row: kept
    for path in (orphan, staging, fresh):
        _write_adapter(path)
    old = time.time() - 7200
    for path in (orphan, staging):
        os.utime(path, (old, old))
    worker = setup.worker(ScriptedTrainer())
    worker._sweep_work_dirs()
    worker._sweep_adapters()
    assert not data.exists() and (setup.data / "work" / queued.id).is_dir()
    assert not orphan.exists() and not staging.exists() and fresh.is_dir()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_worker_process_starts_and_stops_on_a_signal(tmp_path: Path, stop_signal: int) -> None:
    env = {**os.environ, "GATEWAY_DATA_DIR": str(tmp_path / "data"), "GATEWAY_FINETUNE__POLL_SECONDS": "0.01"}
    process = subprocess.Popen(
        [sys.executable, "-m", "finetune.worker"],
        env=env,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    deadline = time.monotonic() + 60
    assert process.stderr is not None
    line = b""
    while b"worker.started" not in line and time.monotonic() < deadline:
        line = process.stderr.readline()
    assert b"worker.started" in line, line
    assert json.loads(line)["worker_id"].endswith("-0")
    time.sleep(0.2)  # into the idle poll loop
    process.send_signal(stop_signal)
    assert process.wait(timeout=30) == 0
    assert b"worker.stopped" in process.stderr.read()


@pytest.fixture
def stop_signals_blocked() -> Iterator[None]:
    """As `main` does before it starts the loop; restored so the rest of the session keeps its handlers."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@pytest.mark.usefixtures("stop_signals_blocked")
def test_a_stop_signal_ends_a_loop_that_waits_on_the_shutdown_event() -> None:
    """The loop spins on `shutdown.wait()`, the pattern an `Event.set()` signal handler deadlocked; the
    signal is sent to this (main) thread only, so no other thread of the test session can take it."""
    shutdown = threading.Event()
    on_loop_thread: list[bool] = []

    def loop() -> None:
        on_loop_thread.append(threading.current_thread() is not threading.main_thread())
        while not shutdown.wait(0.0001):
            pass

    main = threading.main_thread().ident
    assert main is not None
    for _ in range(10):
        shutdown.clear()
        on_loop_thread.clear()
        threading.Timer(0.01, signal.pthread_kill, (main, signal.SIGTERM)).start()
        _run_until_signalled(loop, shutdown)
        assert shutdown.is_set() and on_loop_thread == [True]


@pytest.mark.usefixtures("stop_signals_blocked")
def test_a_second_signal_exits_at_once() -> None:
    shutdown, step_done = threading.Event(), threading.Event()
    exits: list[int] = []

    def slow_step() -> None:  # a training step that will not notice `shutdown` for a long while
        step_done.wait(30)

    def exit_now(code: int) -> None:
        exits.append(code)
        step_done.set()  # os._exit would end the process here; the test lets the thread end instead

    main = threading.main_thread().ident
    threading.Timer(0.01, signal.pthread_kill, (main, signal.SIGTERM)).start()
    threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT)).start()
    _run_until_signalled(slow_step, shutdown, exit_now)
    assert shutdown.is_set() and exits == [128 + signal.SIGINT]


@pytest.mark.usefixtures("stop_signals_blocked")
def test_a_loop_that_fails_fails_the_worker_process() -> None:
    def loop() -> None:
        raise RuntimeError("the store is gone")

    with pytest.raises(RuntimeError, match="the store is gone"):
        _run_until_signalled(loop, threading.Event())


def test_with_the_real_trainer_the_adapter_is_servable(tmp_path: Path) -> None:
    """The worker's settings reach finetune.trainer as it expects, and what it exports the engine can load."""
    import torch
    from transformers import LlamaForCausalLM

    from gateway.engine.local.lora import LoraAdapter
    from tests.unit.test_data import make_chatml_tokenizer

    tokenizer = make_chatml_tokenizer()
    torch.manual_seed(0)
    config = tiny_llama_config(
        len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    setup = _setup(tmp_path)
    model_dir = Path(setup.settings.models.base[BASE])
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    job = setup.job(save_steps=1)
    setup.store.jobs.update(
        job.id,
        hyperparameters={
            **job.hyperparameters,
            "n_epochs": 2,
            "batch_size": 2,
            "max_seq_length": 64,
            "learning_rate": 1e-2,
        },
    )
    Worker(setup.settings, store=setup.store, heartbeat_seconds=0.05).run_once()
    done = _job(setup, job.id)
    assert done.status == "succeeded", done.error
    assert done.trained_tokens is not None and done.trained_tokens > 0
    final = setup.store.models.get(str(done.fine_tuned_model))
    assert final is not None
    adapter = LoraAdapter.load("t", setup.data / final.path, num_layers=2, dtype=torch.float32)
    assert adapter.num_modules == 2 * 7  # every linear projection of both layers ("all-linear")
    metrics = [e for e in setup.store.events.list_page(job.id, limit=100).items if e.type == "metrics"]
    assert [e.data["step"] for e in reversed(metrics) if e.data] == [1, 2, 3, 4]
    # every step saved one; finetune.keep_checkpoints (2) exports stay, and the list agrees with the disk
    assert {c.step for c in setup.store.checkpoints.list_page(job.id).items} == {3, 4}
    assert sorted(p.name for p in (setup.data / final.path).parent.iterdir()) == [
        "ckpt-step-3",
        "ckpt-step-4",
        "final",
    ]
    results = setup.store.files.get(done.result_files[0], None)
    assert results is not None and b"".join(setup.blobs.chunks(results.path)).startswith(b"step,train_loss")
    setup.store.close()


def test_a_worker_started_by_gateway_serve_stops_when_the_gateway_dies(tmp_path: Path) -> None:
    """Even a SIGKILLed gateway leaves no orphan worker training on (PR_SET_PDEATHSIG)."""
    import signal
    import subprocess
    import sys

    env = {**os.environ, "GATEWAY_DATA_DIR": str(tmp_path / "data"), "GATEWAY_FINETUNE__POLL_SECONDS": "0.1"}
    parent_code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-m', 'finetune.worker'])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    # the parent's command line reads like `python -m gateway.cli serve`, which is what the worker looks for
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code, "gateway.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert parent.stdout is not None
    worker_pid = int(parent.stdout.readline())
    lock = tmp_path / "data" / "workers"
    deadline = time.monotonic() + 30
    while not list(lock.glob("*.lock")) and time.monotonic() < deadline:  # the worker is up
        time.sleep(0.1)
    time.sleep(0.5)  # and past its start-up (before `main` blocks SIGTERM, the signal just ends it)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(worker_pid, signal.SIGKILL)
    raise AssertionError("the worker outlived the gateway that started it")
