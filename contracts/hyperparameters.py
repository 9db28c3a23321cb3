"""Fine-tuning hyperparameters: one table holds each setting's type, range, default and meaning.

The gateway validates a job's `hyperparameters` against it when the job is created (every bad or unknown key
is named at once, with what is allowed) and stores the resolved values; the worker turns them into the
trainer's settings with `training_settings`.  OpenAI's three (`n_epochs`, `batch_size`,
`learning_rate_multiplier`, each may be "auto") come first; the rest are this server's LoRA / QLoRA settings,
accepted in the same object.

    resolved = resolve({"n_epochs": 2, "lora_rank": 16}, rows=120)   # raises InvalidHyperparameters
    TrainConfig(**training_settings(resolved), base_model_path=..., ...)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from contracts.lora import LORA_TARGET_MODULES

__all__ = [
    "BY_NAME",
    "DEFAULTS",
    "HYPERPARAMETERS",
    "OPENAI_KEYS",
    "Hyperparameter",
    "InvalidHyperparameters",
    "auto_batch_size",
    "estimated_steps",
    "resolve",
    "training_settings",
]

Kind = Literal["int", "float", "modules", "quantization"]


@dataclass(frozen=True)
class Hyperparameter:
    name: str
    kind: Kind
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself not allowed
    high_open: bool = False
    auto: bool = False  # "auto" (and, as OpenAI's SDK may send it, null) picks the default

    def allowed(self) -> str:
        """What may be given, for an error message."""
        if self.kind == "modules":
            return f'a list of distinct names from {", ".join(LORA_TARGET_MODULES)}, or "all-linear"'
        if self.kind == "quantization":
            return "4 (QLoRA, NF4), 8 (8-bit base weights) or null (full precision)"
        noun = "an integer" if self.kind == "int" else "a number"
        if self.low is not None and self.high is not None:
            below = "above" if self.low_open else "from"
            above = "below" if self.high_open else "to"
            text = f"{noun} {below} {_number(self.low)} {above} {_number(self.high)}"
        else:
            text = noun
        return text + (', or "auto"' if self.auto else "")

    def check(self, value: Any) -> str | None:
        """Why `value` is not allowed, or None."""
        if self.kind == "modules":
            if value == "all-linear":
                return None
            ok = (
                isinstance(value, list)
                and value
                and all(isinstance(m, str) and m in LORA_TARGET_MODULES for m in value)
                and len(set(value)) == len(value)
            )
            return None if ok else "not allowed"
        if self.kind == "quantization":
            allowed = value is None or (value in (4, 8) and not isinstance(value, bool))
            return None if allowed else "not allowed"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "not a number"
        if self.kind == "int" and not (isinstance(value, int) or float(value).is_integer()):
            return "not an integer"
        low_bad = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        high_bad = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return "out of range" if low_bad or high_bad else None


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


HYPERPARAMETERS: tuple[Hyperparameter, ...] = (
    Hyperparameter("n_epochs", "int", 3, "passes over the training data", 1, 50, auto=True),
    Hyperparameter(
        "batch_size",
        "int",
        8,
        "examples per micro-batch, packed into one row without padding; auto = rows // 8, from 1 to 8",
        1,
        256,
        auto=True,
    ),
    Hyperparameter(
        "learning_rate_multiplier",
        "float",
        1.0,
        "scales learning_rate (OpenAI's knob); the rate used is learning_rate * learning_rate_multiplier",
        0,
        100,
        low_open=True,
        auto=True,
    ),
    Hyperparameter("learning_rate", "float", 2e-4, "the base peak AdamW learning rate", 0, 1, True, True),
    Hyperparameter("lora_rank", "int", 8, "rank r of the LoRA matrices", 1, 256),
    Hyperparameter("lora_alpha", "int", 16, "LoRA updates are scaled by lora_alpha / lora_rank", 1, 4096),
    Hyperparameter(
        "lora_dropout", "float", 0.05, "dropout on the LoRA input in training", 0, 1, high_open=True
    ),
    Hyperparameter(
        "target_modules", "modules", list(LORA_TARGET_MODULES), "the projections that get an adapter"
    ),
    Hyperparameter("quantization_bit", "quantization", None, "4: QLoRA (NF4 base); 8: 8-bit base; null: off"),
    Hyperparameter("gradient_accumulation_steps", "int", 1, "micro-batches summed into one step", 1, 1024),
    Hyperparameter("max_seq_length", "int", 1024, "examples are truncated to this many tokens", 16, 32768),
    Hyperparameter(
        "save_steps", "int", 0, "a servable checkpoint every this many steps (0: only the last)", 0, 1_000_000
    ),
)
BY_NAME = {h.name: h for h in HYPERPARAMETERS}
DEFAULTS: dict[str, Any] = {h.name: h.default for h in HYPERPARAMETERS}  # a job's batch_size: auto_batch_size
OPENAI_KEYS = ("n_epochs", "batch_size", "learning_rate_multiplier")


class InvalidHyperparameters(ValueError):
    """Every problem found, as (key, message) pairs, in the order the keys were given."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(message for _, message in problems))
        self.problems = problems


def auto_batch_size(rows: int) -> int:
    return max(1, min(8, rows // 8))


def estimated_steps(values: Mapping[str, Any], rows: int) -> int:
    """Optimizer steps of a job (at most: packing several short examples into a row only lowers it)."""
    micro_batches = math.ceil(max(rows, 1) / values["batch_size"])
    return int(values["n_epochs"]) * math.ceil(micro_batches / values["gradient_accumulation_steps"])


def _server_limits(
    values: Mapping[str, Any], rows: int, max_lora_rank: int | None, max_checkpoints: int | None
) -> list[tuple[str, str]]:
    """The limits this server sets on top of the table: lora_rank's cap and save_steps' floor."""
    problems: list[tuple[str, str]] = []
    if max_lora_rank and values["lora_rank"] > max_lora_rank:
        problems.append(
            ("lora_rank", f"lora_rank={values['lora_rank']} is above this server's limit of {max_lora_rank}")
        )
    save_steps = values["save_steps"]
    if max_checkpoints and save_steps > 0:
        steps = estimated_steps(values, rows)
        floor = math.ceil(steps / max_checkpoints)
        if save_steps < floor:
            problems.append(
                (
                    "save_steps",
                    f"save_steps={save_steps} would save up to {math.ceil(steps / save_steps)} checkpoints "
                    f"of {steps} steps, past this server's limit of {max_checkpoints} per job: use "
                    f"save_steps >= {floor}, or 0 for only the last",
                )
            )
    return problems


def resolve(
    given: Mapping[str, Any] | None,
    *,
    rows: int,
    max_lora_rank: int | None = None,
    max_checkpoints: int | None = None,
) -> dict[str, Any]:
    """Every setting, from `given` where it says so and the defaults elsewhere ("auto" resolved).
    `max_lora_rank` and `max_checkpoints` (a floor on save_steps) are the server's limits, when set."""
    given = dict(given or {})
    problems: list[tuple[str, str]] = []
    unknown = [key for key in given if key not in BY_NAME]
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        problems.append(
            (unknown[0], f"unknown hyperparameter {names}: the settings are {', '.join(BY_NAME)}")
        )
    values = dict(DEFAULTS)
    values["batch_size"] = auto_batch_size(rows)
    for key, value in given.items():
        spec = BY_NAME.get(key)
        if spec is None:
            continue
        if spec.auto and (value == "auto" or value is None):
            continue
        why = spec.check(value)
        if why is not None:
            problems.append((key, f"{key}={value!r} is {why}: use {spec.allowed()}"))
            continue
        values[key] = value
    if values["target_modules"] == "all-linear":
        values["target_modules"] = list(LORA_TARGET_MODULES)
    if not problems and values["learning_rate"] * values["learning_rate_multiplier"] >= 1:
        problems.append(
            ("learning_rate_multiplier", "learning_rate * learning_rate_multiplier must stay below 1")
        )
    if not problems:
        problems += _server_limits(values, rows, max_lora_rank, max_checkpoints)
    if problems:
        raise InvalidHyperparameters(problems)
    for spec in HYPERPARAMETERS:  # 3.0 for an integer setting becomes 3
        if spec.kind == "int":
            values[spec.name] = int(values[spec.name])
        elif spec.kind == "float":
            values[spec.name] = float(values[spec.name])
    return values


def training_settings(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """The trainer's settings (finetune.config.TrainConfig field names) for resolved hyperparameters."""
    settings = {key: value for key, value in resolved.items() if key in BY_NAME}
    multiplier = settings.pop("learning_rate_multiplier")
    settings["learning_rate"] = settings["learning_rate"] * multiplier
    settings["target_modules"] = tuple(settings["target_modules"])
    return settings
