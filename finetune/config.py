"""What one fine-tuning run is asked to do: TrainConfig, its defaults and the checks that reject a bad value.

Its own module because three parties read it and none should need the training loop to do so: the worker
(fills it from a job's hyperparameters), the trainer (runs it) and the checkpoint fingerprint (what of it
fixes the loss curve).  Importing it costs torch only for `validate`'s CUDA check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from contracts.hyperparameters import BY_NAME
from contracts.lora import LORA_TARGET_MODULES

__all__ = ["InvalidSetting", "TrainConfig"]


class InvalidSetting(ValueError):
    """A TrainConfig field whose value cannot work; `setting` names it."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


def _job_setting(name: str) -> Any:
    """A field that is also a job hyperparameter: its default and help come from the shared contract."""
    spec = BY_NAME[name]
    default = tuple(spec.default) if isinstance(spec.default, list) else spec.default
    return field(default=default, metadata={"help": spec.help})


@dataclass
class TrainConfig:
    """One fine-tuning run; every field documented in its `help` metadata (peft style)."""

    base_model_path: Path = field(metadata={"help": "transformers directory of the base model"})
    output_dir: Path = field(
        metadata={"help": "private (0700) directory for checkpoints/, adapter/ and metrics.csv"},
    )
    training_file: Path = field(
        metadata={"help": "chat JSONL or Alpaca JSON/JSONL (see contracts.training_data)"}
    )
    validation_file: Path | None = field(
        default=None,
        metadata={"help": "optional held-out file in the same format; adds valid_loss"},
    )
    seed: int = field(
        default=42,
        metadata={"help": "seeds the LoRA init, dropout and data order: same seed and data, same loss curve"},
    )
    n_epochs: int = _job_setting("n_epochs")
    batch_size: int = _job_setting("batch_size")  # a job's: resolved from its rows when "auto"
    gradient_accumulation_steps: int = _job_setting("gradient_accumulation_steps")
    max_tokens_per_batch: int | None = field(
        default=None,
        metadata={
            "help": "cap on the tokens of one micro-batch (memory); None = batch_size * max_seq_length"
        },
    )
    max_seq_length: int = _job_setting("max_seq_length")
    learning_rate: float = field(
        default=BY_NAME["learning_rate"].default,
        metadata={"help": "peak AdamW learning rate (a job's learning_rate * learning_rate_multiplier)"},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    warmup_ratio: float = field(
        default=0.03,
        metadata={
            "help": "share of the steps the learning rate ramps up linearly; then it decays linearly to 0"
        },
    )
    max_grad_norm: float = field(
        default=1.0,
        metadata={"help": "gradients are clipped to this global L2 norm"},
    )
    lora_rank: int = _job_setting("lora_rank")
    lora_alpha: int = _job_setting("lora_alpha")
    lora_dropout: float = _job_setting("lora_dropout")
    target_modules: tuple[str, ...] = _job_setting("target_modules")
    quantization_bit: int | None = _job_setting("quantization_bit")
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute activations during backward: less memory, about 30% slower"},
    )
    logging_steps: int = field(
        default=1,
        metadata={"help": "a metrics event every this many optimizer steps (and at the last)"},
    )
    save_steps: int = _job_setting("save_steps")
    keep_checkpoints: int = field(
        default=0,
        metadata={
            "help": "checkpoints kept in output_dir (the newest), older ones deleted; 0 = all (the worker "
            "passes finetune.keep_checkpoints)"
        },
    )
    eval_steps: int | None = field(
        default=None,
        metadata={"help": "validate every this many steps (and at the last); None = every save_steps"},
    )
    device: Literal["auto", "cpu", "cuda"] = field(
        default="auto",
        metadata={"help": "auto = cuda when torch sees one, else cpu"},
    )
    resume_from: Path | None = field(
        default=None,
        metadata={
            "help": (
                "checkpoint directory to resume from; None = the latest complete one in output_dir, if any"
            )
        },
    )

    def validate(self) -> None:
        """Raise InvalidSetting naming the first field whose value cannot work."""
        positive = ("n_epochs", "batch_size", "gradient_accumulation_steps", "max_seq_length", "lora_rank")
        for name in (*positive, "logging_steps"):
            _check(self, name, getattr(self, name) >= 1, "must be at least 1")
        _check(self, "seed", self.seed >= 0, "must be >= 0")
        _check(self, "training_file", self.training_file.is_file(), "no such file")
        _check(
            self,
            "validation_file",
            self.validation_file is None or self.validation_file.is_file(),
            "no such file",
        )
        _check(
            self, "base_model_path", (self.base_model_path / "config.json").is_file(), "no config.json there"
        )
        _check(self, "learning_rate", 0 < self.learning_rate < 1, "must be in (0, 1)")
        _check(self, "weight_decay", 0 <= self.weight_decay < 1, "must be in [0, 1)")
        _check(self, "warmup_ratio", 0 <= self.warmup_ratio < 1, "must be in [0, 1)")
        _check(self, "max_grad_norm", self.max_grad_norm > 0, "must be > 0")
        _check(self, "lora_alpha", self.lora_alpha > 0, "must be > 0")
        _check(self, "lora_dropout", 0 <= self.lora_dropout < 1, "must be in [0, 1)")
        unknown = set(self.target_modules) - set(LORA_TARGET_MODULES)
        _check(
            self,
            "target_modules",
            bool(self.target_modules) and not unknown,
            f"choose from {LORA_TARGET_MODULES}",
        )
        _check(self, "quantization_bit", self.quantization_bit in (None, 4, 8), "must be None, 4 or 8")
        _check(self, "save_steps", self.save_steps >= 0, "must be >= 0")
        _check(self, "keep_checkpoints", self.keep_checkpoints >= 0, "must be >= 0")
        _check(self, "eval_steps", self.eval_steps is None or self.eval_steps >= 1, "must be None or >= 1")
        _check(self, "device", self.device in ("auto", "cpu", "cuda"), "must be auto, cpu or cuda")
        _check(
            self, "device", self.device != "cuda" or torch.cuda.is_available(), "torch sees no CUDA device"
        )
        limit = self.max_tokens_per_batch
        _check(
            self, "max_tokens_per_batch", limit is None or limit >= self.max_seq_length, ">= max_seq_length"
        )
        if self.quantization_bit is not None:
            try:
                import bitsandbytes  # noqa: F401 - only its presence is checked here
            except ImportError as exc:
                raise InvalidSetting(
                    "quantization_bit",
                    f"quantization_bit={self.quantization_bit} needs bitsandbytes (pip install bitsandbytes)",
                ) from exc


def _check(config: TrainConfig, name: str, ok: bool, rule: str) -> None:
    if not ok:
        raise InvalidSetting(name, f"{name}={getattr(config, name)!r}: {rule}")
