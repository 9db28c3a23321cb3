"""Running one claimed job through finetune.trainer, and what the worker tracks while it trains.

JobTrainer turns a job row into a trainer call: it prepares the job's base model, decrypts the training data
into the job's private work dir (removed the moment the trainer has read it), hands the trainer the data
dir's cipher to seal its checkpoints with, maps the job's hyperparameters onto TrainConfig, and turns the
trainer's events into job events (one `metrics` event per logging step, an estimated finish time for the
heartbeat).  What the trainer raises comes out as JobFailed, with a message the user can act on, or as
Stopped when training stopped because the worker was told to.  Nothing here logs training rows or file
content.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts.blobs import BlobStorage
from contracts.hyperparameters import BY_NAME, training_settings
from gateway.core.settings import Settings
from gateway.store import JobRecord, Store
from gateway.store.events import EventLevel, EventType

__all__ = ["JobFailed", "JobRun", "JobTrainer", "Stopped", "add_event"]

CheckpointSink = Callable[["JobRun", int, Path], None]


class JobFailed(Exception):
    """A failure the user can act on: `message` says what and what to change; `param` names the field."""

    def __init__(self, message: str, *, code: str = "training_failed", param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


class Stopped(Exception):
    """The trainer stopped because should_stop() said so."""


@dataclass
class JobRun:
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


def add_event(
    store: Store,
    job: JobRecord,
    message: str,
    *,
    level: EventLevel = "info",
    type: EventType = "message",
    data: dict[str, Any] | None = None,
) -> None:
    store.events.add(job.id, message, level=level, type=type, data=data)


class JobTrainer:
    """Trains one job's adapter; each checkpoint the trainer saves goes to on_checkpoint(run, step, path)."""

    def __init__(
        self,
        settings: Settings,
        data_dir: Path,
        store: Store,
        blobs: BlobStorage,
        on_checkpoint: CheckpointSink,
        trainer: Any = None,
    ) -> None:
        """`trainer`: the module providing TrainConfig, train and TrainingCancelled (default
        finetune.trainer, imported when the first job starts so an idle worker never loads torch)."""
        self.settings, self.data_dir = settings, data_dir
        self.store, self.blobs = store, blobs
        self.on_checkpoint = on_checkpoint
        self._trainer = trainer

    @property
    def trainer(self) -> Any:
        if self._trainer is None:
            import finetune.trainer

            self._trainer = finetune.trainer
        return self._trainer

    def train(self, run: JobRun, should_stop: Callable[[], bool]) -> Any:
        from contracts.base_models import BaseModelError, prepare

        job = run.job
        try:
            source = self.settings.models.sources()[job.model]
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
                should_stop,
                sealer=self.blobs.cipher,  # checkpoints sealed like the data dir's other files
            )
        except trainer.TrainingCancelled:
            raise Stopped() from None
        except trainer.InvalidSetting as exc:  # the trainer names the setting it refused
            raise JobFailed(
                f"Training could not start: {exc}",
                code="invalid_training_setup",
                param=_param_of(exc.setting),
            ) from None
        except ValueError as exc:  # the training data, as the trainer read it
            raise JobFailed(f"Training could not start: {exc}", code="invalid_training_setup") from None
        except torch_oom() as exc:
            raise JobFailed(
                "The training device ran out of memory: lower batch_size or max_seq_length, or set "
                "quantization_bit to 4.",
                code="out_of_memory",
            ) from exc

    def _plaintext(self, job: JobRecord, file_id: str, work_dir: Path, stem: str) -> Path:
        record = self.store.files.get(file_id, job.tenant)
        param = "training_file" if stem == "train" else "validation_file"
        if record is None or not self.blobs.exists(record.path):
            raise JobFailed(
                f"The {param.replace('_', ' ')} {file_id} was deleted before training started; upload "
                "it again and create a new job.",
                param=param,
                code="invalid_file",
            )
        suffix = ".json" if record.filename.lower().endswith(".json") else ".jsonl"
        target = work_dir / "data" / f"{stem}{suffix}"
        if not target.is_file():
            self.blobs.decrypt_to(record.path, target)
        return target

    def _config(
        self, job: JobRecord, base_dir: Path, train_file: Path, valid_file: Path | None, output_dir: Path
    ) -> Any:
        return self.trainer.TrainConfig(
            **training_settings(job.hyperparameters),
            base_model_path=base_dir,
            output_dir=output_dir,
            training_file=train_file,
            validation_file=valid_file,
            seed=job.seed,
            device=self.settings.finetune.device,
            keep_checkpoints=self.settings.finetune.keep_checkpoints,
        )

    def _on_event(self, run: JobRun, kind: str, message: str, data: dict[str, Any]) -> None:
        """The trainer's events: started, metrics (each logging step), validation, checkpoint."""
        if kind == "metrics":
            self._metrics(run, data)
        elif kind == "checkpoint":
            self.on_checkpoint(run, int(data["step"]), Path(data["path"]))
        elif kind == "validation":
            run.last_valid_loss = float(data["valid_loss"])
            add_event(self.store, run.job, message, type="metrics", data=data)
        elif kind == "started":
            # the trainer has read the data into memory: its plaintext copy goes now, not when the run ends
            # (a resumed run decrypts it again)
            shutil.rmtree(run.work_dir / "data", ignore_errors=True)
            run.first_step, run.started = int(data.get("resumed_from_step", 0)), time.monotonic()
            if run.first_step:
                message += f" (resumed from the checkpoint at step {run.first_step})"
            add_event(self.store, run.job, message, data=data)
        else:
            add_event(self.store, run.job, message, data=data)

    def _metrics(self, run: JobRun, data: dict[str, Any]) -> None:
        step, total = int(data["step"]), int(data.get("total_steps") or 0)
        run.last_train_loss = float(data["train_loss"])
        if total and step > run.first_step:
            per_step = (time.monotonic() - run.started) / (step - run.first_step)
            run.estimated_finish = int(time.time() + per_step * max(0, total - step))
        where = f"Step {step}/{total}" if total else f"Step {step}"
        message = f"{where}: training loss={run.last_train_loss:.4f}"
        add_event(self.store, run.job, message, type="metrics", data=data)


def _param_of(setting: str) -> str | None:
    """The job field behind a TrainConfig setting the trainer refused, if it is one the user gave."""
    if setting in ("training_file", "validation_file"):
        return setting
    if setting == "learning_rate":  # the product of the two job settings
        return "hyperparameters.learning_rate_multiplier"
    return f"hyperparameters.{setting}" if setting in BY_NAME else None


def torch_oom() -> type[BaseException]:
    import torch

    return torch.OutOfMemoryError
