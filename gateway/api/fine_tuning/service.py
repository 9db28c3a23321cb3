"""Fine-tuning jobs: create (validate and queue), list, retrieve, cancel, events, checkpoints.

The gateway only writes the queue; a worker process (finetune/worker.py) claims and runs the jobs.  A new job
is stored as `validating_files`, checked in the background (the files still exist, belong to the tenant and
hold training rows) and moved to `queued`; a gateway restarted in between finishes the check at start-up.
Cancel is one conditional UPDATE: a queued job is cancelled at once, a running one too, and its worker sees
the status change at its next heartbeat (about a second) and stops training.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import threading
import time
from typing import Any

import structlog

from contracts import hyperparameters
from contracts.blobs import BlobStorage
from contracts.names import invalid_suffix
from gateway.api.fine_tuning import protocol as p
from gateway.api.models.registry import ModelRegistry
from gateway.auth.quotas import Quotas
from gateway.core.errors import InvalidRequest, NotFound
from gateway.core.principal import Principal
from gateway.store import ACTIVE, FileRecord, JobRecord, Store, new_id

__all__ = [
    "JobService",
    "job_not_found",
    "resolve",
]

log = structlog.get_logger(__name__)


def job_not_found(job_id: str) -> NotFound:
    return NotFound(
        f"Fine-tuning job {job_id} not found.", param="fine_tuning_job_id", code="fine_tuning_job_not_found"
    )


_METHOD_KEYS = ("type", "supervised", "dpo", "reinforcement")
_METHODS = ("supervised", "dpo", "reinforcement")


def resolve(
    request: p.CreateJobRequest,
    rows: int,
    *,
    max_lora_rank: int | None = None,
    max_checkpoints: int | None = None,
) -> tuple[dict[str, Any], str]:
    """Every training setting, with "auto" and omitted values resolved; and the JSON path they came from."""
    given, where = _given_hyperparameters(request)
    try:
        resolved = hyperparameters.resolve(
            given, rows=rows, max_lora_rank=max_lora_rank, max_checkpoints=max_checkpoints
        )
        return resolved, where
    except hyperparameters.InvalidHyperparameters as exc:
        label = "Invalid hyperparameter" if len(exc.problems) == 1 else "Invalid hyperparameters"
        raise InvalidRequest(f"{label}: {exc}.", param=f"{where}.{exc.problems[0][0]}") from None


def _given_hyperparameters(request: p.CreateJobRequest) -> tuple[dict[str, Any] | None, str]:
    if request.method is None:
        return _object(request.hyperparameters, "hyperparameters"), "hyperparameters"
    method = request.method
    unknown = [key for key in method if key not in _METHOD_KEYS]
    if unknown:
        raise InvalidRequest(
            f"Unknown field(s) in method: {', '.join(map(repr, unknown))}; method takes "
            f"{', '.join(_METHOD_KEYS)}.",
            param=f"method.{unknown[0]}",
        )
    kind = method.get("type")
    if kind not in _METHODS:
        raise InvalidRequest(
            f"method.type must be one of {', '.join(_METHODS)}, not {kind!r}.", param="method.type"
        )
    if kind != "supervised":
        raise InvalidRequest(
            f"Fine-tuning method '{kind}' is not supported by this server; use 'supervised'.",
            param="method.type",
        )
    if request.hyperparameters is not None:
        raise InvalidRequest(
            "Pass hyperparameters in method.supervised.hyperparameters or in the deprecated "
            "top-level hyperparameters, not both.",
            param="hyperparameters",
        )
    supervised = _object(method.get("supervised"), "method.supervised") or {}
    extra = [key for key in supervised if key != "hyperparameters"]
    if extra:
        raise InvalidRequest(
            f"Unknown field(s) in method.supervised: {', '.join(map(repr, extra))}; it takes "
            "hyperparameters.",
            param=f"method.supervised.{extra[0]}",
        )
    where = "method.supervised.hyperparameters"
    return _object(supervised.get("hyperparameters"), where), where


def _object(value: Any, param: str) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    raise InvalidRequest(f"{param} must be an object.", param=param)


class JobService:
    def __init__(
        self,
        store: Store,
        blobs: BlobStorage,
        registry: ModelRegistry,
        *,
        quotas: Quotas | None = None,
        max_lora_rank: int | None = None,
        max_checkpoints: int | None = None,
    ) -> None:
        self.max_lora_rank = max_lora_rank
        self.max_checkpoints = max_checkpoints
        self.store = store
        self.blobs = blobs
        self.registry = registry
        self.quotas = quotas
        self._quota_lock = threading.Lock()  # count + insert as one step
        self._tasks: set[asyncio.Task[None]] = set()

    # -- create ---------------------------------------------------------------------------------------------

    async def create(self, principal: Principal, request: p.CreateJobRequest) -> p.Job:
        job = await asyncio.to_thread(self._create, principal, request)
        self._spawn_validation(job.id)
        return self.to_protocol(job)

    def _create(self, principal: Principal, request: p.CreateJobRequest) -> JobRecord:
        base = self._base_model(principal, request.model)
        training = self._training_file(principal, request.training_file, "training_file")
        if request.validation_file is not None:
            self._training_file(principal, request.validation_file, "validation_file")
        if request.suffix is not None and invalid_suffix(request.suffix):
            raise InvalidRequest(
                "Invalid suffix: use only letters, digits, '.', '_' and '-'.", param="suffix"
            )
        hyperparameters, _ = resolve(
            request,
            training.rows or 0,
            max_lora_rank=self.max_lora_rank,
            max_checkpoints=self.max_checkpoints,
        )
        job = JobRecord(
            id=new_id("ftjob-"),
            tenant=principal.tenant,
            subject=principal.subject,
            model=base,
            training_file=training.id,
            validation_file=request.validation_file,
            suffix=request.suffix,
            seed=request.seed if request.seed is not None else secrets.randbelow(2**31),
            metadata=request.metadata,
            hyperparameters=hyperparameters,
            status="validating_files",
            created_at=int(time.time()),
        )
        with self._quota_lock:
            if self.quotas is not None:
                self.quotas.check_waiting_jobs(principal.tenant, self.store.jobs.waiting(principal.tenant))
                _, used_bytes = self.store.usage(principal.tenant, self.blobs.data_dir)
                self.quotas.check_job_storage(principal.tenant, used_bytes)
            with self.store.db.transaction():
                self.store.jobs.add(job)
                self.store.events.add(job.id, f"Created fine-tuning job: {job.id}")
        log.info("fine_tuning.job_created", job_id=job.id, model=base, rows=training.rows)
        return job

    def _base_model(self, principal: Principal, model: str) -> str:
        try:
            entry = self.registry.get(model, principal)
        except NotFound:
            raise InvalidRequest(
                f"Model {model} is not available for fine-tuning or does not exist.",
                param="model",
                code="model_not_available",
            ) from None
        if entry.kind != "chat":
            raise InvalidRequest(
                f"Model {model} is an embedding model; only chat models can be fine-tuned here.",
                param="model",
                code="model_not_available",
            )
        if not entry.is_base:
            raise InvalidRequest(
                f"Model {model} is a fine-tuned model; fine-tune its base model {entry.base} instead.",
                param="model",
                code="model_not_available",
            )
        return entry.id

    def _training_file(self, principal: Principal, file_id: str, param: str) -> FileRecord:
        record = self.store.files.get(file_id, principal.tenant)
        if record is None:
            raise InvalidRequest(
                f"Invalid {param}: no file {file_id} is available to you.", param=param, code="invalid_file"
            )
        if record.purpose != "fine-tune":
            raise InvalidRequest(
                f"Invalid {param}: file {file_id} has purpose '{record.purpose}'; upload training "
                "data with purpose 'fine-tune'.",
                param=param,
                code="invalid_file_purpose",
            )
        return record

    def _spawn_validation(self, job_id: str) -> None:
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self.validate, job_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def validate(self, job_id: str) -> None:
        """validating_files -> queued, or -> failed with an error naming the file.  Blocking (file I/O)."""
        job = self.store.jobs.get(job_id)
        if job is None or job.status != "validating_files":
            return
        error: dict[str, Any] | None = None
        for param in ("training_file", "validation_file"):
            file_id = getattr(job, param)
            if file_id is None:
                continue
            self.store.events.add(job.id, f"Validating {param.replace('_', ' ')}: {file_id}")
            record = self.store.files.get(file_id, job.tenant)
            if record is None or not self.blobs.exists(record.path):
                error = {
                    "code": "invalid_file",
                    "param": param,
                    "message": f"The {param.replace('_', ' ')} {file_id} was deleted before the job started.",
                }
                break
            if not record.rows:
                error = {
                    "code": "invalid_file",
                    "param": param,
                    "message": f"The {param.replace('_', ' ')} {file_id} holds no training examples.",
                }
                break
        now = int(time.time())
        with self.store.db.transaction():
            if error is None:
                if self.store.jobs.update(job.id, status_in=("validating_files",), status="queued"):
                    self.store.events.add(job.id, "Files validated, moving job to queued state")
            elif self.store.jobs.update(
                job.id, status_in=("validating_files",), status="failed", error=error, finished_at=now
            ):
                self.store.events.add(job.id, f"Fine-tuning job failed: {error['message']}", level="error")

    async def start(self) -> None:
        """Finish validations a previous run of the gateway left half done."""
        for job in self.store.jobs.with_status(("validating_files",)):
            self._spawn_validation(job.id)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- read -----------------------------------------------------------------------------------------------

    def get_record(self, principal: Principal, job_id: str) -> JobRecord:
        job = self.store.jobs.get(job_id, None if principal.is_admin else principal.tenant)
        if job is None:
            raise job_not_found(job_id)
        return job

    def get(self, principal: Principal, job_id: str) -> p.Job:
        return self.to_protocol(self.get_record(principal, job_id))

    def list(
        self, principal: Principal, *, after: str | None, limit: int, metadata: dict[str, str] | None
    ) -> p.JobList:
        result = self.store.jobs.list_page(
            None if principal.is_admin else principal.tenant, after=after, limit=limit, metadata=metadata
        )
        return p.JobList(data=[self.to_protocol(j) for j in result.items], has_more=result.has_more)

    def events(self, principal: Principal, job_id: str, *, after: str | None, limit: int) -> p.JobEventList:
        job = self.get_record(principal, job_id)
        result = self.store.events.list_page(job.id, after=after, limit=limit)
        return p.JobEventList(
            data=[
                p.JobEvent(
                    id=e.id,
                    created_at=e.created_at,
                    level=e.level,
                    message=e.message,
                    type=e.type,
                    data=e.data or {},
                )
                for e in result.items
            ],
            has_more=result.has_more,
        )

    def checkpoints(
        self, principal: Principal, job_id: str, *, after: str | None, limit: int
    ) -> p.CheckpointList:
        job = self.get_record(principal, job_id)
        result = self.store.checkpoints.list_page(job.id, after=after, limit=limit)
        data = [
            p.Checkpoint(
                id=c.id,
                created_at=c.created_at,
                fine_tuned_model_checkpoint=c.model,
                step_number=c.step,
                metrics=_numbers(c.metrics),
                fine_tuning_job_id=c.job_id,
            )
            for c in result.items
        ]
        return p.CheckpointList(
            data=data,
            has_more=result.has_more,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
        )

    # -- cancel ---------------------------------------------------------------------------------------------

    def cancel(self, principal: Principal, job_id: str) -> p.Job:
        job = self.get_record(principal, job_id)
        now = int(time.time())
        with self.store.db.transaction():
            cancelled = self.store.jobs.update(
                job.id, status_in=ACTIVE, status="cancelled", finished_at=now, estimated_finish=None
            )
            if cancelled:
                self.store.events.add(job.id, "Fine-tuning job cancelled")
        if not cancelled:
            current = self.store.jobs.get(job.id)
            status = current.status if current is not None else job.status
            raise InvalidRequest(
                f"Fine-tuning job {job.id} has already {status}; only validating, queued or running "
                "jobs can be cancelled.",
                param="fine_tuning_job_id",
                code="job_not_cancellable",
            )
        log.info("fine_tuning.job_cancelled", job_id=job.id, was=job.status)
        return self.get(principal, job.id)

    # -- shape ----------------------------------------------------------------------------------------------

    @staticmethod
    def to_protocol(job: JobRecord) -> p.Job:
        hyper = job.hyperparameters
        openai_hyper = {k: hyper[k] for k in hyperparameters.OPENAI_KEYS}
        extras = {k: v for k, v in hyper.items() if k not in hyperparameters.OPENAI_KEYS}
        error = (
            p.JobError(
                code=str(job.error.get("code", "error")),
                message=str(job.error.get("message", "")),
                param=job.error.get("param"),
            )
            if job.error
            else None
        )
        return p.Job(
            id=job.id,
            created_at=job.created_at,
            error=error,
            fine_tuned_model=job.fine_tuned_model,
            finished_at=job.finished_at,
            hyperparameters=openai_hyper,
            model=job.model,
            organization_id=job.tenant,
            result_files=list(job.result_files),
            status=job.status,  # type: ignore[arg-type]
            trained_tokens=job.trained_tokens,
            training_file=job.training_file,
            validation_file=job.validation_file,
            seed=job.seed,
            estimated_finish=job.estimated_finish if job.status == "running" else None,
            method={"type": "supervised", "supervised": {"hyperparameters": {**openai_hyper, **extras}}},
            metadata=job.metadata,
        )


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
