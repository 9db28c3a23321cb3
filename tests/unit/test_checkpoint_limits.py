"""What one job may cost on disk: a cap on lora_rank, a floor on save_steps (at most N checkpoints a job),
both a clear 400 at creation; and the trainer keeps only the newest K checkpoints (prune_checkpoints)."""

from __future__ import annotations

from pathlib import Path

import pytest

from contracts.hyperparameters import InvalidHyperparameters, estimated_steps, resolve
from finetune.checkpoints import complete_checkpoints, prune_checkpoints
from finetune.config import TrainConfig
from tests.unit.test_jobs_api import running


def test_lora_rank_above_the_servers_cap_is_refused_with_the_limit() -> None:
    assert resolve({"lora_rank": 64}, rows=8, max_lora_rank=64)["lora_rank"] == 64
    with pytest.raises(InvalidHyperparameters) as refused:
        resolve({"lora_rank": 128}, rows=8, max_lora_rank=64)
    assert refused.value.problems == [("lora_rank", "lora_rank=128 is above this server's limit of 64")]
    assert resolve({"lora_rank": 256}, rows=8)["lora_rank"] == 256  # no cap given: the table's range


def test_save_steps_has_a_floor_of_total_steps_over_max_checkpoints() -> None:
    values = resolve({"n_epochs": 2, "batch_size": 4}, rows=400)
    assert estimated_steps(values, 400) == 200
    assert resolve({"n_epochs": 2, "batch_size": 4, "save_steps": 20}, rows=400, max_checkpoints=10)
    with pytest.raises(InvalidHyperparameters) as refused:
        resolve({"n_epochs": 2, "batch_size": 4, "save_steps": 1}, rows=400, max_checkpoints=10)
    [(key, message)] = refused.value.problems
    assert key == "save_steps" and "save up to 200 checkpoints" in message and "save_steps >= 20" in message
    # 0 (only the last) is always allowed; small jobs may checkpoint every step
    assert resolve({"save_steps": 0}, rows=10**6, max_checkpoints=10)["save_steps"] == 0
    assert (
        resolve({"save_steps": 1, "batch_size": 8, "n_epochs": 1}, rows=32, max_checkpoints=10)["save_steps"]
        == 1
    )


def test_the_api_answers_400_naming_the_parameter(tmp_path: Path) -> None:
    with running(tmp_path / "data") as api:
        training = api.upload()
        for given, param in (({"lora_rank": 128}, "lora_rank"), ({"save_steps": 1}, "save_steps")):
            body = {"model": "smollm2-135m-instruct", "training_file": training, "hyperparameters": given}
            if param == "save_steps":  # 6 rows, batch 1, 30 epochs: 180 steps, so at most 100 -> floor 2
                given.update({"batch_size": 1, "n_epochs": 30})
            response = api.create(body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == f"hyperparameters.{param}" and "this server's limit" in error["message"]


def _checkpoint(output_dir: Path, step: int) -> None:
    path = output_dir / "checkpoints" / f"step-{step}"
    path.mkdir(parents=True)
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "trainer_state.json",
        "trainer_state.pt",
    ):
        (path / name).write_bytes(b"x")


def test_prune_keeps_the_newest_k_complete_checkpoints(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8, 10):
        _checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / "step-12").mkdir()  # incomplete (a crash mid-write): not counted, kept
    removed = prune_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["step-2", "step-4", "step-6"]
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-8", "step-10"]
    assert (tmp_path / "checkpoints" / "step-12").is_dir()
    assert prune_checkpoints(tmp_path, 0) == [] and len(complete_checkpoints(tmp_path)) == 2


def test_the_worker_hands_the_trainer_its_retention() -> None:
    from gateway.core.settings import Settings

    assert TrainConfig.__dataclass_fields__["keep_checkpoints"].default == 0  # the library keeps all
    assert Settings().finetune.keep_checkpoints == 2  # a job keeps the newest two
