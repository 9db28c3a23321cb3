"""The fine-tuning API: CreateFineTuningJobRequest in, FineTuningJob / events / checkpoints out.

Hyperparameters are OpenAI's three (`n_epochs`, `batch_size`, `learning_rate_multiplier`, each may be "auto")
plus this server's LoRA settings, accepted in the same object.  Range errors name the field's path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

__all__ = [
    "Checkpoint",
    "CheckpointList",
    "CreateJobRequest",
    "Hyperparameters",
    "Job",
    "JobError",
    "JobEvent",
    "JobEventList",
    "JobList",
    "Method",
    "SupervisedMethod",
]

Auto = Literal["auto"]
MetadataKey = Annotated[str, Meta(min_length=1, max_length=64, pattern=r'^[^"\\]+$')]
MetadataValue = Annotated[str, Meta(max_length=512)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Meta(max_length=16)]


class Hyperparameters(Struct, kw_only=True, omit_defaults=True):
    n_epochs: Annotated[int, Meta(ge=1, le=50)] | Auto | UnsetType = UNSET
    batch_size: Annotated[int, Meta(ge=1, le=256)] | Auto | UnsetType | None = UNSET
    learning_rate_multiplier: Annotated[float, Meta(gt=0.0, le=100.0)] | Auto | UnsetType = UNSET
    # LoRA / QLoRA settings (this server's extension)
    learning_rate: Annotated[float, Meta(gt=0.0, le=1.0)] | UnsetType = UNSET
    lora_rank: Annotated[int, Meta(ge=1, le=256)] | UnsetType = UNSET
    lora_alpha: Annotated[int, Meta(ge=1, le=4096)] | UnsetType = UNSET
    lora_dropout: Annotated[float, Meta(ge=0.0, lt=1.0)] | UnsetType = UNSET
    target_modules: (
        Annotated[list[str], Meta(min_length=1, max_length=7)] | Literal["all-linear"] | UnsetType
    ) = UNSET
    quantization_bit: Literal[4, 8] | UnsetType | None = UNSET
    gradient_accumulation_steps: Annotated[int, Meta(ge=1, le=1024)] | UnsetType = UNSET
    max_seq_length: Annotated[int, Meta(ge=16, le=32768)] | UnsetType = UNSET
    save_steps: Annotated[int, Meta(ge=0, le=1_000_000)] | UnsetType = UNSET


class SupervisedMethod(Struct, kw_only=True, omit_defaults=True):
    hyperparameters: Hyperparameters | UnsetType = UNSET


class Method(Struct, kw_only=True, omit_defaults=True):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | UnsetType = UNSET
    dpo: dict[str, Any] | UnsetType = UNSET
    reinforcement: dict[str, Any] | UnsetType = UNSET


class CreateJobRequest(Struct, kw_only=True):
    model: Annotated[str, Meta(min_length=1)]
    training_file: Annotated[str, Meta(min_length=1)]
    validation_file: str | None = None
    suffix: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    seed: Annotated[int, Meta(ge=0, le=2_147_483_647)] | None = None
    metadata: Metadata | None = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None  # deprecated by OpenAI in favour of method; still sent
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
