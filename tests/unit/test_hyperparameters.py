"""The hyperparameter contract: every bad or unknown key named at once, with what is allowed; "auto" and the
defaults resolved; the trainer's settings derived, not copied by hand."""

from __future__ import annotations

import dataclasses

import pytest

from contracts.hyperparameters import (
    DEFAULTS,
    HYPERPARAMETERS,
    InvalidHyperparameters,
    resolve,
    training_settings,
)
from contracts.lora import LORA_TARGET_MODULES
from finetune.config import TrainConfig


def test_defaults_and_auto_resolve() -> None:
    values = resolve({"n_epochs": "auto", "batch_size": None, "lora_rank": 16}, rows=40)
    assert values["n_epochs"] == 3 and values["batch_size"] == 5 and values["lora_rank"] == 16
    assert values["target_modules"] == list(LORA_TARGET_MODULES)
    assert resolve({}, rows=1000)["batch_size"] == 8 and resolve({}, rows=3)["batch_size"] == 1
    assert resolve({"target_modules": "all-linear"}, rows=8)["target_modules"] == list(LORA_TARGET_MODULES)
    assert resolve({"n_epochs": 2.0}, rows=8)["n_epochs"] == 2 and isinstance(
        resolve({"learning_rate_multiplier": 2}, rows=8)["learning_rate_multiplier"], float
    )


def test_every_problem_is_named_with_what_is_allowed() -> None:
    with pytest.raises(InvalidHyperparameters) as info:
        resolve({"bogus_param": 1, "n_epochs": "three", "lora_rank": 0, "also_bogus": 2}, rows=8)
    problems = dict(info.value.problems)
    assert list(problems) == ["bogus_param", "n_epochs", "lora_rank"]
    assert "'bogus_param', 'also_bogus'" in problems["bogus_param"] and "n_epochs" in problems["bogus_param"]
    assert (
        problems["n_epochs"] == "n_epochs='three' is not a number: use an integer from 1 to 50, or \"auto\""
    )
    assert problems["lora_rank"] == "lora_rank=0 is out of range: use an integer from 1 to 256"
    assert "Invalid enum" not in str(info.value)


@pytest.mark.parametrize(
    ("given", "key"),
    [
        ({"n_epochs": True}, "n_epochs"),
        ({"n_epochs": 1.5}, "n_epochs"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"quantization_bit": 5}, "quantization_bit"),
        ({"quantization_bit": True}, "quantization_bit"),
        ({"target_modules": ["q_proj", "q_proj"]}, "target_modules"),
        ({"target_modules": []}, "target_modules"),
        ({"learning_rate": 0.5, "learning_rate_multiplier": 4}, "learning_rate_multiplier"),
    ],
)
def test_bad_values(given: dict[str, object], key: str) -> None:
    with pytest.raises(InvalidHyperparameters) as info:
        resolve(given, rows=8)
    assert info.value.problems[0][0] == key


def test_the_trainer_settings_are_the_resolved_values_with_the_effective_rate() -> None:
    resolved = resolve({"learning_rate": 1e-3, "learning_rate_multiplier": 2.0}, rows=16)
    settings = training_settings(resolved)
    assert settings["learning_rate"] == pytest.approx(2e-3) and "learning_rate_multiplier" not in settings
    assert settings["target_modules"] == LORA_TARGET_MODULES
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(settings) <= fields  # every hyperparameter is a trainer setting of the same name


def test_the_trainer_defaults_are_the_contract_defaults() -> None:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for spec in HYPERPARAMETERS:
        if spec.name in fields:
            default = fields[spec.name].default
            expected = (
                tuple(DEFAULTS[spec.name]) if isinstance(DEFAULTS[spec.name], list) else DEFAULTS[spec.name]
            )
            assert default == expected, spec.name
