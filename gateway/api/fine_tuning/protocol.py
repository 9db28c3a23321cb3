"""The fine-tuning API: CreateFineTuningJobRequest in, FineTuningJob / events / checkpoints out.

`method` and `hyperparameters` arrive as plain objects: the service checks them key by key against the
settings in contracts/hyperparameters.py, so an error names every bad or unknown key with what is allowed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

__all__ = [
    "Checkpoint",
    "CheckpointList",
    "CreateJobRequest",
    "Job",
    "JobError",
    "JobEvent",
    "JobEventList",
    "JobList",
]

MetadataKey = Annotated[str, Meta(min_length=1, max_length=64, pattern=r'^[^"\\]+$')]
MetadataValue = Annotated[str, Meta(max_length=512)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Meta(max_length=16)]


class CreateJobRequest(Struct, kw_only=True):
    model: Annotated[str, Meta(min_length=1)]
    training_file: Annotated[str, Meta(min_length=1)]
    validation_file: str | None = None
    suffix: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    seed: Annotated[int, Meta(ge=0, le=2_147_483_647)] | None = None
    metadata: Metadata | None = None
    # Read as plain objects and checked key by key in the service, so every unknown or bad key is named
    # at once (contracts/hyperparameters.py has the settings).
    method: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] | None = None  # deprecated by OpenAI in favour of method; still sent
    integrations: list[dict[str, Any]] | None = None


# -- responses ---------------------------------------------------------------------------------------------


class JobError(Struct):
    code: str
    message: str
    param: str | None


class Job(Struct):
    id: str
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str
    result_files: list[str]
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    seed: int
    estimated_finish: int | None
    method: dict[str, Any]
    metadata: dict[str, str] | None
    integrations: list[dict[str, Any]] | None = None
    object: Literal["fine_tuning.job"] = "fine_tuning.job"


class JobList(Struct):
    data: list[Job]
    has_more: bool
    object: Literal["list"] = "list"


class JobEvent(Struct):
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any]
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"


class JobEventList(Struct):
    data: list[JobEvent]
    has_more: bool
    object: Literal["list"] = "list"


class Checkpoint(Struct):
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    step_number: int
    metrics: dict[str, float]
    fine_tuning_job_id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"


class CheckpointList(Struct):
    data: list[Checkpoint]
    has_more: bool
    first_id: str | None
    last_id: str | None
    object: Literal["list"] = "list"
