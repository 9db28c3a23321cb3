"""What a job leaves for the gateway: its adapters as servable models, and its results file.

Every checkpoint the trainer saves becomes a `<fine-tuned name>:ckpt-step-N` model, and a finished job its
final adapter under the fine-tuned name itself plus a metrics CSV the user can download.  Each adapter
reaches the store complete or not at all: its files go into a staging directory under
<data_dir>/adapters/<job>/, which is renamed into place, and only then is the model row added (the gateway
loads nothing without a row).  The trainer's files are already sealed as the data dir's cipher would write
them, so they are hard-linked, not copied (no second copy on disk); any other file is encrypted on the way.

Only the newest `finetune.keep_checkpoints` checkpoint exports of a job stay: an older one loses its model
and checkpoint rows first, then its files, so the store never lists a checkpoint whose files are gone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

from contracts.blobs import BlobStorage
from contracts.names import checkpoint_name, fine_tuned_name
from contracts.private_files import ensure_private_dir
from finetune.job_training import JobFailed, JobRun, add_event
from gateway.security.encryption import Cipher, header_key_id
from gateway.store import CheckpointRecord, FileRecord, JobRecord, ModelRecord, Store, new_id

__all__ = ["Publisher"]

log = structlog.get_logger(__name__)

_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class Publisher:
    def __init__(
        self,
        store: Store,
        blobs: BlobStorage,
        cipher: Cipher,
        data_dir: Path,
        worker_id: str,
        *,
        keep_checkpoints: int = 0,
    ) -> None:
        """`keep_checkpoints`: checkpoint exports kept per job, the newest (0 keeps all)."""
        self.store, self.blobs, self.cipher = store, blobs, cipher
        self.data_dir, self.worker_id = data_dir, worker_id
        self.keep_checkpoints = keep_checkpoints

    def checkpoint(self, run: JobRun, step: int, source: Path) -> None:
        """The trainer's checkpoint at `step` (in `source`) as a checkpoint row and a servable model."""
        job = run.job
        relative = self._export(source, job.id, f"ckpt-step-{step}")
        # the trainer reports a step's losses before its checkpoint
        losses = {"train_loss": run.last_train_loss, "valid_loss": run.last_valid_loss}
        metrics = {"step": step, **{k: v for k, v in losses.items() if v is not None}}
        now = int(time.time())
        model = _model_record(job, relative, now, step=step)
        with self.store.db.transaction():
            self.store.checkpoints.add(
                CheckpointRecord(
                    id=new_id("ftckpt-"),
                    job_id=job.id,
                    step=step,
                    created_at=now,
                    metrics=metrics,
                    model=model.id,
                )
            )
            if self.store.models.add(model):
                add_event(self.store, job, f"Checkpoint created at step {step}")
        self.prune(job.id)

    def prune(self, job_id: str) -> list[str]:
        """Drop all but the newest `keep_checkpoints` checkpoint exports of a job: rows first, then files.
        Returns the model ids removed (the gateway's hot-load poll unregisters them)."""
        if self.keep_checkpoints <= 0:
            return []
        steps = sorted(
            (m for m in self.store.models.for_job(job_id) if m.step is not None), key=lambda m: m.step or 0
        )
        removed: list[str] = []
        for old in steps[: -self.keep_checkpoints]:
            for record in self.store.models.delete(old.id):  # its checkpoints row goes with it
                shutil.rmtree(self.data_dir / record.path, ignore_errors=True)
                removed.append(record.id)
        return removed

    def final(self, run: JobRun, result: Any) -> None:
        """The job succeeded: its final adapter, its results file, and the job row saying so, together."""
        job = run.job
        steps = getattr(result, "steps", None)
        last = self.data_dir / "adapters" / job.id / f"ckpt-step-{steps}"
        if steps is not None and all((last / name).is_file() for name in _ADAPTER_FILES):
            # the final adapter is the last step's checkpoint (the trainer saves one there): exported once
            relative = self._link(last, job.id, "final")
        else:
            relative = self._export(Path(result.adapter_dir), job.id, "final")
        trained = int(result.trained_tokens)
        results = self._results_file(job, self._read(Path(result.metrics_csv)))
        now = int(time.time())
        model = _model_record(job, relative, now)
        with self.store.db.transaction():
            done = self.store.jobs.update(
                job.id,
                status_in=("running",),
                worker_id=self.worker_id,
                status="succeeded",
                fine_tuned_model=model.id,
                trained_tokens=trained,
                finished_at=now,
                estimated_finish=None,
                result_files=[results.id],
            )
            if done:
                self.store.models.add(model)
                add_event(self.store, job, f"New fine-tuned model created: {model.id}")
                add_event(self.store, job, "The job has successfully completed")
        if not done:  # cancelled (or taken over) in the last instant: nothing of it stays
            self.store.files.delete(results.id)
            self.blobs.remove(results.path)
            shutil.rmtree(self.data_dir / relative, ignore_errors=True)
            return
        log.info("worker.job_succeeded", job_id=job.id, trained_tokens=trained)

    def _results_file(self, job: JobRecord, data: bytes) -> FileRecord:
        """The job's metrics CSV as a file of its tenant (purpose fine-tune-results), body first."""
        file_id = new_id("file-")
        record = FileRecord(
            id=file_id,
            tenant=job.tenant,
            filename=f"{job.id}-results.csv",
            purpose="fine-tune-results",
            bytes=len(data),
            created_at=int(time.time()),
            path=f"files/{file_id}",
        )
        self.blobs.put_bytes(data, record.path)
        return self.store.files.add(record)

    def _read(self, path: Path) -> bytes:
        """A file the trainer wrote: sealed by the data dir's cipher (the real trainer) or plain."""
        if header_key_id(path) is None:
            return path.read_bytes()
        return b"".join(self.cipher.open_decrypted(path))

    def _export(self, source: Path, job_id: str, name: str) -> str:
        """Link (or encrypt) an adapter into <data_dir>/adapters/<job>/<name>; complete or absent."""
        parent = ensure_private_dir(self.data_dir / "adapters" / job_id)
        target = parent / name
        if target.is_dir():  # a resumed job saving the same step again
            return str(target.relative_to(self.data_dir))
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=parent))
        try:
            for filename in _ADAPTER_FILES:
                src = source / filename
                if not src.is_file():
                    raise JobFailed(
                        f"The trainer saved no {filename} in its adapter; this is a bug.",
                        code="internal_error",
                    )
                if self.cipher.enabled == (header_key_id(src) is not None):  # as the cipher writes it
                    _link_or_copy(src, staging / filename)
                else:
                    with open(src, "rb") as fh:
                        self.cipher.encrypt_stream(fh, staging / filename)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return str(target.relative_to(self.data_dir))

    def _link(self, exported: Path, job_id: str, name: str) -> str:
        """<data_dir>/adapters/<job>/<name> as hard links to an exported adapter: no second copy on disk, and
        each directory can still be deleted on its own."""
        parent = exported.parent
        target = parent / name
        if target.is_dir():
            return str(target.relative_to(self.data_dir))
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=parent))
        try:
            for filename in _ADAPTER_FILES:
                os.link(exported / filename, staging / filename)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return str(target.relative_to(self.data_dir))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o600)


def _model_record(job: JobRecord, path: str, created_at: int, *, step: int | None = None) -> ModelRecord:
    """The servable model of one of a job's adapters: the final one (step None) or the checkpoint at step."""
    name = fine_tuned_name(job.model, job.tenant, job.suffix, job.id)
    return ModelRecord(
        id=name if step is None else checkpoint_name(name, step),
        tenant=job.tenant,
        base=job.model,
        job_id=job.id,
        path=path,
        created_at=created_at,
        step=step,
    )
