"""The fine-tuning worker: `python -m finetune.worker [--config F]`.

One process, one job at a time, on the training device.  It shares the data dir (and so the SQLite store)
with the gateway, here or on another machine, and talks to it only through the store:

    claim     the oldest queued job, or a running one whose worker died (its lease ran out, or it had this
              worker's id: a restarted worker knows its predecessor is gone), in one BEGIN IMMEDIATE
    heartbeat every second a thread renews the lease; a job no longer `running` under this worker (the user
              cancelled it) sets the stop flag the trainer polls, so training stops within a step or two
    events    trainer events -> job events (one `metrics` event per logging step), checkpoints -> servable
              `...:ckpt-step-N` models, success -> the final adapter, a metrics CSV, `fine_tuned_model`
    resume    a job whose worker was killed restarts from the trainer's latest complete checkpoint in the
              job's work dir; after MAX_ATTEMPTS interruptions it fails with a message saying so
    shutdown  SIGTERM/SIGINT stop training at the next step and hand the job back to the queue, work dir kept

Every adapter reaches the store complete or not at all: files are written into a staging directory, which is
renamed into place, and only then is the model row added (the gateway loads nothing without a row).  The work
dir (plaintext training data, trainer checkpoints) is private and removed when the job ends, whatever the
outcome.  Nothing here logs training rows or file content.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import io
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from gateway.encryption import Cipher, cipher_from_settings
from gateway.private_files import ensure_private_dir
from gateway.serving.files import FileStorage
from gateway.serving.jobs import DEFAULT_HYPERPARAMETERS, fine_tuned_name
from gateway.settings import Settings, load_settings
from gateway.store import CheckpointRecord, JobRecord, ModelRecord, Store, new_id
from gateway.store.events import EventLevel, EventType

__all__ = ["MAX_ATTEMPTS", "Worker", "main"]

log = structlog.get_logger(__name__)

MAX_ATTEMPTS = 3
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class JobFailed(Exception):
    """A failure the user can act on: `message` says what and what to change; `param` names the field."""

    def __init__(self, message: str, *, code: str = "training_failed", param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


@dataclass
class _Run:
    """What the worker tracks while one job trains."""

    job: JobRecord
    work_dir: Path
    stop: threading.Event = field(default_factory=threading.Event)
    stop_reason: str | None = None  # "cancelled" | "lost" (the job is no longer ours)
    started: float = field(default_factory=time.monotonic)  # when training (not loading) began
    first_step: int = 0  # a resumed run starts after this step
    last_train_loss: float | None = None
    last_valid_loss: float | None = None
    estimated_finish: int | None = None


class Worker:
    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        cipher: Cipher | None = None,
        worker_id: str | None = None,
        lease_seconds: float = 30.0,
        heartbeat_seconds: float = 1.0,
        trainer: Any = None,
    ) -> None:
        """`trainer`: the module providing TrainConfig, train and TrainingCancelled (default
        finetune.trainer, imported when the first job starts so an idle worker never loads torch)."""
        self.settings = settings
        self._trainer = trainer
        self.data_dir = ensure_private_dir(settings.data_path)
        self.store = store or Store.open(self.data_dir)
        self.cipher = cipher or cipher_from_settings(settings)
        self.storage = FileStorage(self.store, self.cipher, self.data_dir)
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self._slot_lock: io.TextIOWrapper | None = None
        self.worker_id = worker_id or self._take_slot()
        self.shutdown = threading.Event()

    @property
    def trainer(self) -> Any:
        if self._trainer is None:
            import finetune.trainer

            self._trainer = finetune.trainer
        return self._trainer

    def _take_slot(self) -> str:
        """`<host>-<n>` for the first free slot n on this host, held by an flock for the process's life: the
        id is stable across restarts, so a restarted worker reclaims its dead predecessor's job at once."""
        host = socket.gethostname()
        directory = ensure_private_dir(self.data_dir / "workers")
        for slot in range(64):
            fh = open(directory / f"{host}-{slot}.lock", "w")  # noqa: SIM115 - held until exit
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            self._slot_lock = fh
            return f"{host}-{slot}"
        raise RuntimeError("more than 64 workers on this host share the data dir")

    # -- the loop ------------------------------------------------------------------------------------------

    def run_forever(self) -> None:
        log.info("worker.started", worker_id=self.worker_id)
        self._sweep_work_dirs()
        while not self.shutdown.is_set():
            if not self.run_once():
                self.shutdown.wait(self.settings.finetune.poll_seconds)
        log.info("worker.stopped", worker_id=self.worker_id)

    def run_once(self) -> bool:
        """Claim and run one job; False when the queue is empty."""
        job = self.store.jobs.claim(self.worker_id, now=time.time(), lease_seconds=self.lease_seconds)
        if job is None:
            return False
        self.run(job)
        return True

    def run(self, job: JobRecord) -> None:
        run = _Run(job=job, work_dir=ensure_private_dir(self.data_dir / "work" / job.id))
        log.info("worker.job_claimed", job_id=job.id, attempt=job.attempts)
        beat = threading.Thread(target=self._heartbeat, args=(run,), name="heartbeat", daemon=True)
        beat.start()
        keep_work_dir = False
        try:
            if job.attempts > MAX_ATTEMPTS:
                raise JobFailed(
                    f"The fine-tuning worker stopped {job.attempts - 1} times while running this job "
                    "(killed, out of memory, or the machine restarted), so it was not retried again. "
                    "Check the worker's memory and logs, then create the job again.",
                    code="worker_interrupted",
                )
            if job.attempts > 1:
                self._event(
                    job, f"Resuming fine-tuning job (attempt {job.attempts}) from its latest checkpoint"
                )
            else:
                self._event(job, "Fine-tuning job started")
            result = self._train(run)
            self._succeed(run, result)
        except JobFailed as exc:
            self._fail(run, exc)
        except _Stopped:
            keep_work_dir = self._stopped(run)
        except Exception as exc:
            log.error("worker.job_error", job_id=job.id, error_type=type(exc).__name__)
            self._fail(run, JobFailed(f"Training failed: {type(exc).__name__}: {str(exc)[:500]}"))
        finally:
            run.stop.set()
            beat.join(timeout=5)
            if not keep_work_dir:
                shutil.rmtree(run.work_dir, ignore_errors=True)

    def _heartbeat(self, run: _Run) -> None:
        while not run.stop.wait(self.heartbeat_seconds):
            try:
                ours = self.store.jobs.heartbeat(
                    run.job.id,
                    self.worker_id,
                    lease_until=time.time() + self.lease_seconds,
                    estimated_finish=run.estimated_finish,
                )
            except Exception as exc:  # a busy database: the lease has slack; try again next beat
                log.warning("worker.heartbeat_failed", job_id=run.job.id, error_type=type(exc).__name__)
                continue
            if not ours:
                current = self.store.jobs.get(run.job.id)
                run.stop_reason = (
                    "cancelled" if current is not None and current.status == "cancelled" else "lost"
                )
                run.stop.set()
                return

    def _should_stop(self, run: _Run) -> bool:
        return run.stop.is_set() or self.shutdown.is_set()

    # -- training ------------------------------------------------------------------------------------------

    def _train(self, run: _Run) -> Any:
        from finetune.base_model import BaseModelError, base_model_sources, prepare

        job = run.job
        try:
            source = base_model_sources(self.settings)[job.model]
            base_dir = prepare(job.model, source, self.data_dir)
        except (KeyError, BaseModelError) as exc:
            raise JobFailed(
                f"The base model {job.model} is not available to this worker: {exc}. Configure the "
                "same models.base on the worker as on the gateway.",
                param="model",
                code="model_not_available",
            ) from None
        train_file = self._plaintext(job, job.training_file, run.work_dir, "train")
        valid_file = (
            self._plaintext(job, job.validation_file, run.work_dir, "valid") if job.validation_file else None
        )
        config = self._config(job, base_dir, train_file, valid_file, run.work_dir / "trainer")
        trainer = self.trainer
        try:
            return trainer.train(
                config,
                lambda kind, message, data: self._on_event(run, kind, message, data),
                lambda: self._should_stop(run),
            )
        except trainer.TrainingCancelled:
            raise _Stopped() from None
        except (
            ValueError
        ) as exc:  # the trainer names the setting: "max_seq_length=16: ..." or "training_file: ..."
            raise JobFailed(
                f"Training could not start: {exc}", code="invalid_training_setup", param=_param_of(str(exc))
            ) from None
        except torch_oom() as exc:
            raise JobFailed(
                "The training device ran out of memory: lower batch_size or max_seq_length, or set "
                "quantization_bit to 4.",
                code="out_of_memory",
            ) from exc

    def _plaintext(self, job: JobRecord, file_id: str, work_dir: Path, stem: str) -> Path:
        record = self.store.files.get(file_id, job.tenant)
        param = "training_file" if stem == "train" else "validation_file"
        if record is None or not self.storage.path_of(record).is_file():
            raise JobFailed(
                f"The {param.replace('_', ' ')} {file_id} was deleted before training started; upload "
                "it again and create a new job.",
                param=param,
                code="invalid_file",
            )
        suffix = ".json" if record.filename.lower().endswith(".json") else ".jsonl"
        target = work_dir / "data" / f"{stem}{suffix}"
        if not target.is_file():
            self.storage.decrypt_to(record, target)
        return target

    def _config(
        self, job: JobRecord, base_dir: Path, train_file: Path, valid_file: Path | None, output_dir: Path
    ) -> Any:
        hp = job.hyperparameters
        return self.trainer.TrainConfig(
            base_model_path=base_dir,
            output_dir=output_dir,
            training_file=train_file,
            validation_file=valid_file,
            seed=job.seed,
            n_epochs=int(hp["n_epochs"]),
            batch_size=int(hp["batch_size"]),
            gradient_accumulation_steps=int(hp["gradient_accumulation_steps"]),
            max_seq_length=int(hp["max_seq_length"]),
            learning_rate=float(hp["learning_rate"]) * float(hp["learning_rate_multiplier"]),
            lora_rank=int(hp["lora_rank"]),
            lora_alpha=int(hp["lora_alpha"]),
            lora_dropout=float(hp["lora_dropout"]),
            target_modules=tuple(hp["target_modules"]),
            quantization_bit=hp["quantization_bit"],
            save_steps=int(hp["save_steps"]),
            device=self.settings.finetune.device,
        )

    def _on_event(self, run: _Run, kind: str, message: str, data: dict[str, Any]) -> None:
        """The trainer's events: started, metrics (each logging step), validation, checkpoint."""
        if kind == "metrics":
            self._metrics(run, data)
        elif kind == "checkpoint":
            self._checkpoint(run, int(data["step"]), Path(data["path"]))
        elif kind == "validation":
            run.last_valid_loss = float(data["valid_loss"])
            self._event(run.job, message, type="metrics", data=data)
        elif kind == "started":
            run.first_step, run.started = int(data.get("resumed_from_step", 0)), time.monotonic()
            if run.first_step:
                message += f" (resumed from the checkpoint at step {run.first_step})"
            self._event(run.job, message, data=data)
        else:
            self._event(run.job, message, data=data)

    def _metrics(self, run: _Run, data: dict[str, Any]) -> None:
        step, total = int(data["step"]), int(data.get("total_steps") or 0)
        run.last_train_loss = float(data["train_loss"])
        if total and step > run.first_step:
            per_step = (time.monotonic() - run.started) / (step - run.first_step)
            run.estimated_finish = int(time.time() + per_step * max(0, total - step))
        where = f"Step {step}/{total}" if total else f"Step {step}"
        self._event(run.job, f"{where}: training loss={run.last_train_loss:.4f}", type="metrics", data=data)

    def _checkpoint(self, run: _Run, step: int, source: Path) -> None:
        job = run.job
        name = fine_tuned_name(job.model, job.tenant, job.suffix, job.id) + f":ckpt-step-{step}"
        relative = self._export(source, job.id, f"ckpt-step-{step}")
        # the trainer reports a step's losses before its checkpoint
        losses = {"train_loss": run.last_train_loss, "valid_loss": run.last_valid_loss}
        metrics = {"step": step, **{k: v for k, v in losses.items() if v is not None}}
        now = int(time.time())
        with self.store.db.transaction():
            self.store.checkpoints.add(
                CheckpointRecord(
                    id=new_id("ftckpt-"),
                    job_id=job.id,
                    step=step,
                    created_at=now,
                    metrics=metrics,
                    model=name,
                )
            )
            if self.store.models.add(
                ModelRecord(
                    id=name,
                    tenant=job.tenant,
                    base=job.model,
                    job_id=job.id,
                    path=relative,
                    created_at=now,
                    step=step,
                )
            ):
                self._event(job, f"Checkpoint created at step {step}")

    def _export(self, source: Path, job_id: str, name: str) -> str:
        """Copy (or encrypt) an adapter into <data_dir>/adapters/<job>/<name>; complete or absent."""
        parent = ensure_private_dir(self.data_dir / "adapters" / job_id)
        target = parent / name
        if target.is_dir():  # a resumed job saving the same step again
            return str(target.relative_to(self.data_dir))
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=parent))
        try:
            for filename in ADAPTER_FILES:
                src = source / filename
                if not src.is_file():
                    raise JobFailed(
                        f"The trainer saved no {filename} in its adapter; this is a bug.",
                        code="internal_error",
                    )
                with open(src, "rb") as fh:
                    self.cipher.encrypt_stream(fh, staging / filename)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return str(target.relative_to(self.data_dir))

    # -- endings -------------------------------------------------------------------------------------------

    def _succeed(self, run: _Run, result: Any) -> None:
        job = run.job
        name = fine_tuned_name(job.model, job.tenant, job.suffix, job.id)
        relative = self._export(Path(result.adapter_dir), job.id, "final")
        trained = int(result.trained_tokens)
        results = self.storage.save_bytes(
            tenant=job.tenant,
            filename=f"{job.id}-results.csv",
            purpose="fine-tune-results",
            data=Path(result.metrics_csv).read_bytes(),
        )
        now = int(time.time())
        with self.store.db.transaction():
            done = self.store.jobs.update(
                job.id,
                status_in=("running",),
                worker_id=self.worker_id,
                status="succeeded",
                fine_tuned_model=name,
                trained_tokens=trained,
                finished_at=now,
                estimated_finish=None,
                result_files=[results.id],
            )
            if done:
                self.store.models.add(
                    ModelRecord(
                        id=name,
                        tenant=job.tenant,
                        base=job.model,
                        job_id=job.id,
                        path=relative,
                        created_at=now,
                    )
                )
                self._event(job, f"New fine-tuned model created: {name}")
                self._event(job, "The job has successfully completed")
        if not done:  # cancelled (or taken over) in the last instant: nothing of it stays
            self.store.files.delete(results.id)
            self.storage.remove(results)
            shutil.rmtree(self.data_dir / relative, ignore_errors=True)
            return
        log.info("worker.job_succeeded", job_id=job.id, trained_tokens=trained)

    def _fail(self, run: _Run, exc: JobFailed) -> None:
        error = {"code": exc.code, "message": exc.message, "param": exc.param}
        with self.store.db.transaction():
            if self.store.jobs.update(
                run.job.id,
                status_in=("running",),
                worker_id=self.worker_id,
                status="failed",
                error=error,
                finished_at=int(time.time()),
                estimated_finish=None,
            ):
                self._event(run.job, f"Fine-tuning job failed: {exc.message}", level="error")
        log.info("worker.job_failed", job_id=run.job.id, code=exc.code)

    def _stopped(self, run: _Run) -> bool:
        """Training stopped early; True to keep the work dir (the job will resume)."""
        if run.stop_reason == "cancelled":
            self._event(run.job, "Training stopped; the job was cancelled")
            log.info("worker.job_cancelled", job_id=run.job.id)
            return False
        if run.stop_reason == "lost":  # another worker owns it now (our heartbeats stalled): hands off
            log.warning("worker.job_lost", job_id=run.job.id)
            return True
        if self.store.jobs.release(run.job.id, self.worker_id):
            self._event(
                run.job,
                "The fine-tuning worker stopped; the job is queued again and will resume from "
                "its latest checkpoint",
            )
        log.info("worker.job_released", job_id=run.job.id)
        return True

    def _event(
        self,
        job: JobRecord,
        message: str,
        *,
        level: EventLevel = "info",
        type: EventType = "message",
        data: dict[str, Any] | None = None,
    ) -> None:
        self.store.events.add(job.id, message, level=level, type=type, data=data)

    def _sweep_work_dirs(self) -> None:
        """Remove work dirs of jobs that finished while no worker was there to clean up."""
        root = self.data_dir / "work"
        if not root.is_dir():
            return
        for path in root.iterdir():
            job = self.store.jobs.get(path.name)
            if job is None or job.finished:
                shutil.rmtree(path, ignore_errors=True)


class _Stopped(Exception):
    """The trainer stopped because should_stop() said so."""


def _param_of(message: str) -> str | None:
    """The setting a trainer error names first ("lora_rank=0: ..." -> "lora_rank"), if it is one of ours."""
    name = re.split(r"[=:]", message, maxsplit=1)[0].strip()
    if name in ("training_file", "validation_file"):
        return name
    return f"hyperparameters.{name}" if name in DEFAULT_HYPERPARAMETERS else None


def torch_oom() -> type[BaseException]:
    import torch

    return torch.OutOfMemoryError


def _stop_with_gateway_parent() -> None:
    """Started by `gateway serve`: get SIGTERM (hand the job back, exit) when that gateway dies, even by
    SIGKILL, instead of training on as an orphan.  A worker started otherwise (systemd, a shell) is left
    alone."""
    parent = os.getppid()
    try:
        argv = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    except OSError:  # not Linux
        return
    if b"serve" not in argv or not any(part.endswith((b"gateway", b"gateway.cli")) for part in argv):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def main(argv: list[str] | None = None) -> int:
    from gateway.egress import install_from_settings
    from gateway.logs import configure_logging
    from gateway.private_files import restrict_umask

    _stop_with_gateway_parent()  # first: the gateway may die while this process starts up
    parser = argparse.ArgumentParser(prog="python -m finetune.worker", description="Run fine-tuning jobs.")
    parser.add_argument("--config", help="TOML settings file (or GATEWAY_CONFIG)")
    parser.add_argument("--once", action="store_true", help="run at most one job, then exit")
    args = parser.parse_args(argv)
    restrict_umask()
    settings = load_settings(args.config)
    configure_logging(settings.server.log_level)
    install_from_settings(settings)  # no egress from the process that reads training data either
    worker = Worker(settings)

    def stop(signum: int, _frame: Any) -> None:
        # only set the flag: logging here could deadlock on the logger's lock if the signal landed mid-write
        worker.shutdown.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.once:
        worker.run_once()
    else:
        worker.run_forever()
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
