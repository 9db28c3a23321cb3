"""finetune.trainer on a tiny random Llama: packing equivalence, learning, reproducibility, cancel, resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from contracts.lora import LORA_TARGET_MODULES
from contracts.training_data import Turn
from finetune import checkpoints, trainer
from finetune.batches import pack
from finetune.chat_template import IGNORE_INDEX, Example, tokenize
from finetune.lora_model import CpuDropout
from finetune.packed import PACKED_ATTENTION, loss_sum
from finetune.trainer import TrainConfig, TrainingCancelled, train
from gateway.security.encryption import EncryptionError, FileCipher, TamperedError
from tests.unit.test_data import SECRET, make_chatml_tokenizer
from tests.unit.tiny_models import tiny_llama_config

QA = [
    ("What is two plus two?", "It is four."),
    ("The capital of France?", "Paris."),
    ("Translate: bonjour", "hello"),
    ("how are you?", "I am fine, thanks."),
    ("hello world", "hello"),
    ("Answer briefly: two plus two", "four"),
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return make_chatml_tokenizer()


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A two-layer Llama with random weights and grouped-query attention, saved like a real base model."""
    torch.manual_seed(0)
    config = tiny_llama_config(
        len(tokenizer),
        max_position_embeddings=512,
        initializer_range=0.2,  # the default 0.02 caps the logits of a 64-wide model near uniform
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    records = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA
    ]
    records.append(
        {"messages": [{"role": "user", "content": SECRET}, {"role": "assistant", "content": SECRET}]}
    )
    path.write_text("".join(json.dumps(r) + "\n" for r in records * 2))
    return path


def make_config(base_model: Path, data: Path, output_dir: Path, **overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = {
        "base_model_path": base_model,
        "output_dir": output_dir,
        "training_file": data,
        "n_epochs": 2,
        "batch_size": 4,
        "learning_rate": 2e-2,
        "lora_dropout": 0.1,  # dropout draws random numbers: resuming must restore the generator too
        "max_seq_length": 64,
        "device": "cpu",
    }
    return TrainConfig(**(settings | overrides))


class Recorder:
    def __init__(self, stop_after_micro_steps: int | None = None) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.polls = 0
        self.stop_after = stop_after_micro_steps

    def __call__(self, kind: str, message: str, data: dict[str, Any]) -> None:
        self.events.append((kind, message, data))

    def should_stop(self) -> bool:
        self.polls += 1
        return self.stop_after is not None and self.polls > self.stop_after

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [data for k, _, data in self.events if k == kind]

    def losses(self) -> list[float]:
        return [data["train_loss"] for data in self.of("metrics")]


def adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def assert_only_results_left(output_dir: Path) -> None:
    assert sorted(p.name for p in output_dir.iterdir()) == ["adapter", "checkpoints", "metrics.csv"]
    assert not [p for p in output_dir.rglob(".*")], "staging directories left behind"


# --- packing ------------------------------------------------------------------------------------------------


def per_token_losses(logits: torch.Tensor, targets: list[int]) -> torch.Tensor:
    targets_ = torch.tensor(targets)
    return torch.nn.functional.cross_entropy(logits, targets_, reduction="none", ignore_index=IGNORE_INDEX)


def qa_examples(tokenizer: Any, count: int) -> list[Example]:
    conversations = [[Turn("user", q, False), Turn("assistant", a, True)] for q, a in QA[:count]]
    return tokenize(conversations, tokenizer, max_seq_length=64)


@pytest.mark.parametrize("attention", ["packed", "sdpa"])
def test_packed_examples_score_exactly_as_when_alone(
    base_model: Path, tokenizer: Any, attention: str
) -> None:
    """Per-example logits and losses in a packed row equal those of each example run alone with plain sdpa.

    "packed" is the trainer's attention, here with the shared prompt prefix laid down once; "sdpa" is
    transformers' own packed-sequence detection from restarting position_ids
    (masking_utils.find_packed_sequence_indices: no attention_mask, no cache), which knows nothing of a
    shared prefix.
    """
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32).eval()
    examples = qa_examples(tokenizer, 4)
    [batch] = pack(examples, max_tokens_per_batch=1024, seed=0, share_prefix=attention == "packed")
    assert batch.examples == 4
    assert (batch.shared_prefix > 0) == (attention == "packed")  # the template's system prompt, at least

    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0] for e in examples]
        model.set_attn_implementation(PACKED_ATTENTION if attention == "packed" else "sdpa")
        packed = model(
            input_ids=torch.tensor([batch.input_ids]),
            position_ids=torch.tensor([batch.position_ids]),
            cu_seq_lens_q=torch.tensor(batch.boundaries),
            shared_prefix_length=batch.shared_prefix,
            use_cache=False,
        ).logits[0]
        # Control: the same row with plain causal attention over it all lets examples see each other.
        model.set_attn_implementation("sdpa")
        leaky = model(input_ids=torch.tensor([batch.input_ids]), use_cache=False).logits[0]

    prefix = batch.shared_prefix
    starts = [start for start in batch.boundaries[:-1] if not (prefix and start == 0)]
    for start, end in zip(starts, batch.boundaries[len(batch.boundaries) - len(starts) :], strict=True):
        ids = batch.input_ids[:prefix] + batch.input_ids[start:end]
        [(example, reference)] = [
            (e, r) for e, r in zip(examples, alone, strict=True) if e.input_ids[: len(ids)] == ids
        ]
        logits = torch.cat([packed[:prefix], packed[start:end]])
        torch.testing.assert_close(logits, reference[: len(ids)], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            per_token_losses(logits, batch.targets[:prefix] + batch.targets[start:end]),
            per_token_losses(reference[: len(ids)], example.labels[1 : len(ids) + 1]),
            rtol=1e-5,
            atol=1e-5,
        )
    second = starts[1]
    assert not torch.allclose(leaky[second:], packed[second:], atol=1e-3)


def test_loss_sum_counts_only_learned_tokens_and_never_crosses_examples(
    base_model: Path, tokenizer: Any
) -> None:
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32).eval()
    model.set_attn_implementation(PACKED_ATTENTION)
    examples = qa_examples(tokenizer, len(QA))
    [batch] = pack(examples, max_tokens_per_batch=1024, seed=3)
    assert batch.shared_prefix > 0
    assert batch.tokens < batch.example_tokens == sum(len(e.input_ids) for e in examples)
    with torch.no_grad():
        packed_sum = loss_sum(model, batch, torch.device("cpu"))
        alone_sum = 0.0
        for example in examples:
            # transformers' own shifted, mean-reduced loss, scaled back to a sum.
            ids = torch.tensor([example.input_ids])
            loss = model(input_ids=ids, labels=torch.tensor([example.labels]), use_cache=False).loss
            alone_sum += loss.item() * example.trainable_tokens
    assert batch.trainable_tokens == sum(e.trainable_tokens for e in examples)
    assert packed_sum.item() == pytest.approx(alone_sum, rel=1e-5)


def test_packed_batch_gives_the_gradients_of_examples_trained_alone(base_model: Path, tokenizer: Any) -> None:
    torch.manual_seed(0)
    lora = LoraConfig(
        r=4, lora_dropout=0.0, target_modules=list(LORA_TARGET_MODULES), init_lora_weights=False
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32), lora)
    examples = qa_examples(tokenizer, len(QA))
    [batch] = pack(examples, max_tokens_per_batch=1024, seed=0)
    assert batch.shared_prefix > 0

    model.get_base_model().set_attn_implementation(PACKED_ATTENTION)
    loss_sum(model, batch, torch.device("cpu")).backward()
    packed = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.get_base_model().set_attn_implementation("sdpa")
    for example in examples:
        ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels])
        (model(input_ids=ids, labels=labels, use_cache=False).loss * example.trainable_tokens).backward()
    alone = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    assert len(packed) == len(alone) == 2 * 7 * 2  # A and B of seven projections in two layers
    for name, grad in alone.items():
        # Summation order differs (the prefix's gradient arrives summed): compare at fp32 noise level.
        error = (packed[name] - grad).norm() / grad.norm()
        assert error < 1e-5, name


# --- training -----------------------------------------------------------------------------------------------


def test_loss_goes_down_and_the_adapter_loads_with_peft(
    base_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    events = Recorder()
    config = make_config(base_model, chat_file, tmp_path / "out", n_epochs=6, logging_steps=2)
    result = train(config, events, events.should_stop)

    assert {kind for kind, _, _ in events.events} == {"started", "metrics", "checkpoint"}
    assert events.of("started")[0]["examples"] == 14
    metrics = events.of("metrics")
    assert set(metrics[0]) == {
        "step",
        "total_steps",
        "train_loss",
        "learning_rate",
        "tokens_per_second",
        "trained_tokens",
    }
    assert [m["step"] for m in metrics] == list(range(2, result.steps + 1, 2))
    assert result.steps == 6 * 4  # 14 examples in batches of 4, six epochs
    assert events.losses()[-1] < 0.5 * events.losses()[0]
    assert result.final_loss < events.losses()[0]
    assert metrics[-1]["trained_tokens"] == result.trained_tokens
    # Every micro-step polled should_stop (plus none spare: no validation file here).
    assert events.polls == result.steps

    adapter = result.adapter_dir
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert stat.S_IMODE(adapter.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in adapter.iterdir())
    assert stat.S_IMODE(result.metrics_csv.stat().st_mode) == 0o600
    keys = set(adapter_weights(adapter))
    assert len(keys) == 2 * 7 * 2  # A and B, seven projections, two layers
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, adapter)
    ids = torch.tensor([[1, 5, 9, 12]])
    trained_weight = adapter_weights(adapter)
    assert any(torch.count_nonzero(w) for k, w in trained_weight.items() if "lora_B" in k)  # it learned
    plain = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    assert not torch.allclose(loaded(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert_only_results_left(result.adapter_dir.parent)


def test_same_seed_same_curve_other_seed_other_curve(
    base_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    runs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        events = Recorder()
        result = train(
            make_config(base_model, chat_file, tmp_path / name, seed=seed), events, events.should_stop
        )
        runs.append((events.losses(), adapter_weights(result.adapter_dir)))
    (loss_a, weights_a), (loss_b, weights_b), (loss_c, _) = runs
    assert loss_a == loss_b
    for key, value in weights_a.items():
        assert torch.equal(value, weights_b[key])
    assert loss_a != loss_c


def test_validation_events_and_metrics_csv(base_model: Path, chat_file: Path, tmp_path: Path) -> None:
    events = Recorder()
    config = make_config(base_model, chat_file, tmp_path / "out", validation_file=chat_file, save_steps=3)
    result = train(config, events, events.should_stop)
    validations = events.of("validation")
    assert [v["step"] for v in validations] == [3, 6, 8]  # every save_steps and at the end
    assert validations[-1]["valid_loss"] == result.valid_loss
    assert [c["step"] for c in events.of("checkpoint")] == [3, 6, 8]
    rows = result.metrics_csv.read_text().splitlines()
    assert rows[0] == "step,train_loss,valid_loss,learning_rate,tokens_per_second"
    assert len(rows) == 1 + result.steps
    step3 = rows[3].split(",")
    assert step3[0] == "3" and float(step3[2]) == validations[0]["valid_loss"]
    assert rows[1].split(",")[2] == ""  # no validation at step 1


def test_should_stop_cancels_within_a_micro_step(base_model: Path, chat_file: Path, tmp_path: Path) -> None:
    events = Recorder(stop_after_micro_steps=5)
    config = make_config(base_model, chat_file, tmp_path / "out", gradient_accumulation_steps=2, save_steps=1)
    with pytest.raises(TrainingCancelled):
        train(config, events, events.should_stop)
    assert events.polls == 6  # the sixth poll said stop: no further micro-step ran
    assert [c["step"] for c in events.of("checkpoint")] == [1, 2]  # two steps of two micro-steps each
    checkpoints = config.output_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-1", "step-2"]
    assert not (config.output_dir / "adapter").exists()
    assert not [p for p in config.output_dir.rglob(".*")]


def test_resume_continues_the_exact_curve(base_model: Path, chat_file: Path, tmp_path: Path) -> None:
    straight = Recorder()
    whole = train(make_config(base_model, chat_file, tmp_path / "straight"), straight, straight.should_stop)

    interrupted = Recorder(stop_after_micro_steps=5)  # cancelled during step 6, checkpoints at 2 and 4
    config = make_config(base_model, chat_file, tmp_path / "resumed", save_steps=2)
    with pytest.raises(TrainingCancelled):
        train(config, interrupted, interrupted.should_stop)
    resumed = Recorder()
    result = train(config, resumed, resumed.should_stop)  # finds checkpoints/step-4 by itself

    assert resumed.of("started")[0]["resumed_from_step"] == 4
    assert resumed.polls == whole.steps - 4
    assert interrupted.losses() == straight.losses()[:5]
    assert resumed.losses() == straight.losses()[4:]
    assert result.final_loss == whole.final_loss
    assert result.trained_tokens == whole.trained_tokens
    for key, value in adapter_weights(whole.adapter_dir).items():
        assert torch.equal(value, adapter_weights(result.adapter_dir)[key])
    # The metrics file of the resumed run holds each step once.
    steps = [line.split(",")[0] for line in result.metrics_csv.read_text().splitlines()[1:]]
    assert steps == [str(s) for s in range(1, whole.steps + 1)]
    assert [p.name for p in result.checkpoints] == ["step-2", "step-4", "step-6", "step-8"]
    assert_only_results_left(config.output_dir)


def test_explicit_resume_from_and_a_mismatched_checkpoint(
    base_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    first = train(make_config(base_model, chat_file, tmp_path / "a", save_steps=4))
    checkpoint = first.checkpoints[0]
    assert checkpoint.name == "step-4"
    again = Recorder()
    train(
        make_config(base_model, chat_file, tmp_path / "b", resume_from=checkpoint), again, again.should_stop
    )
    assert again.of("started")[0]["resumed_from_step"] == 4
    with pytest.raises(ValueError, match=r"resume_from=.*other data or hyperparameters"):
        train(make_config(base_model, chat_file, tmp_path / "c", resume_from=checkpoint, learning_rate=1e-3))


def test_a_checkpoint_resumes_after_the_data_dir_moves(
    base_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    """A worker that mounts the data dir at another path, or finds it renamed, resumes its checkpoints."""

    def job_config(data_dir: Path) -> TrainConfig:  # laid out as the worker lays out a job
        work = data_dir / "work" / "ftjob-1"
        return make_config(
            data_dir / "models" / "tiny", work / "data" / "train.jsonl", work / "trainer", save_steps=2
        )

    first_mount, second_mount = tmp_path / "mnt-a" / "data", tmp_path / "mnt-b" / "gateway-data"
    shutil.copytree(base_model, first_mount / "models" / "tiny")
    (first_mount / "work" / "ftjob-1" / "data").mkdir(parents=True)
    shutil.copy(chat_file, first_mount / "work" / "ftjob-1" / "data" / "train.jsonl")
    straight = Recorder()
    train(make_config(base_model, chat_file, tmp_path / "straight"), straight, straight.should_stop)

    interrupted = Recorder(stop_after_micro_steps=5)  # cancelled during step 6, checkpoints at 2 and 4
    with pytest.raises(TrainingCancelled):
        train(job_config(first_mount), interrupted, interrupted.should_stop)
    second_mount.parent.mkdir()
    first_mount.rename(second_mount)
    resumed = Recorder()
    result = train(job_config(second_mount), resumed, resumed.should_stop)

    assert resumed.of("started")[0]["resumed_from_step"] == 4
    assert resumed.losses() == straight.losses()[4:]
    assert result.checkpoints[0] == second_mount / "work" / "ftjob-1" / "trainer" / "checkpoints" / "step-2"


def test_the_fingerprint_is_content_not_place(base_model: Path, chat_file: Path, tmp_path: Path) -> None:
    """Copies of the base model and data anywhere agree; other content or hyperparameters do not."""
    model_copy, data_copy = tmp_path / "elsewhere" / "model", tmp_path / "elsewhere" / "t.jsonl"
    shutil.copytree(base_model, model_copy)
    shutil.copy(chat_file, data_copy)
    os.utime(model_copy / "config.json", (0, 0))  # an independent copy need not keep the times
    original = checkpoints.fingerprint(make_config(base_model, chat_file, tmp_path / "a"))
    assert checkpoints.fingerprint(make_config(model_copy, data_copy, tmp_path / "b")) == original
    assert checkpoints.fingerprint(make_config(base_model, chat_file, tmp_path / "a", seed=7)) != original

    data_copy.write_text(chat_file.read_text() + chat_file.read_text().splitlines()[0] + "\n")
    assert checkpoints.fingerprint(make_config(model_copy, data_copy, tmp_path / "b")) != original
    shutil.copy(chat_file, data_copy)
    tokenizer_config = json.loads((model_copy / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = 77
    (model_copy / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert checkpoints.fingerprint(make_config(model_copy, data_copy, tmp_path / "b")) != original
    shutil.copy(base_model / "tokenizer_config.json", model_copy / "tokenizer_config.json")
    with (model_copy / "model.safetensors").open("ab") as fh:  # other weights: a weight file's size differs
        fh.write(b"\0" * 8)
    assert checkpoints.fingerprint(make_config(model_copy, data_copy, tmp_path / "b")) != original


def test_checkpoint_is_atomic_and_private(
    base_model: Path, chat_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(base_model, chat_file, tmp_path / "out", save_steps=2)
    real_save = torch.save
    calls = 0

    def failing_save(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        real_save(obj, path, *args, **kwargs)
        if calls == 2:  # the second checkpoint dies half-written
            raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(config, trainer._ignore_event)
    checkpoints = config.output_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2"]  # no step-4, no staging dir
    step2 = checkpoints / "step-2"
    assert sorted(p.name for p in step2.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "trainer_state.json",
        "trainer_state.pt",
    ]
    assert stat.S_IMODE(checkpoints.stat().st_mode) == stat.S_IMODE(step2.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in step2.iterdir())
    monkeypatch.undo()
    resumed = Recorder()
    train(config, resumed, resumed.should_stop)
    assert resumed.of("started")[0]["resumed_from_step"] == 2


def test_no_temporary_files_anywhere(
    base_model: Path, chat_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    monkeypatch.setenv("TMPDIR", str(system_tmp))
    stale = tmp_path / "out" / "checkpoints" / ".step-9-crashed.tmp"  # left by a killed run
    stale.mkdir(parents=True)
    result = train(make_config(base_model, chat_file, tmp_path / "out", n_epochs=1))
    assert_only_results_left(result.adapter_dir.parent)
    assert list(system_tmp.iterdir()) == []


def test_training_rows_never_reach_logs_or_output(
    base_model: Path,
    chat_file: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    events = Recorder()
    with caplog.at_level(logging.DEBUG):
        train(make_config(base_model, chat_file, tmp_path / "out", n_epochs=1), events, events.should_stop)
    out, err = capfd.readouterr()
    assert SECRET not in caplog.text + out + err + repr(events.events)


def test_qlora_4bit_trains_on_cpu(base_model: Path, chat_file: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    config = make_config(base_model, chat_file, tmp_path / "out", quantization_bit=4, n_epochs=1)
    run = trainer.setup(config)
    try:
        projections = [m for n, m in run.model.named_modules() if n.endswith("self_attn.q_proj.base_layer")]
        assert projections and all(isinstance(m, bnb.nn.Linear4bit) for m in projections)
        assert projections[0].weight.quant_type == "nf4"
        adapted = [m for m in run.model.modules() if hasattr(m, "lora_dropout")]
        assert adapted and not [m for m in adapted if hasattr(m, "_lean_group")]  # peft's forward for bnb
    finally:
        trainer.cleanup(config.output_dir, run)
    events = Recorder()
    result = train(config, events, events.should_stop)
    assert result.steps == 4
    assert all(torch.isfinite(torch.tensor(events.losses())))
    assert events.losses()[-1] < events.losses()[0]
    assert len(adapter_weights(result.adapter_dir)) == 2 * 7 * 2


def test_cpu_dropout_keeps_torch_dropout_distribution() -> None:
    torch.manual_seed(0)
    dropout = CpuDropout(0.1)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = dropout(x)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(0.1, abs=0.002)
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.9))  # survivors scaled to keep the expectation
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, y.detach())  # d(x * keep)/dx = keep
    assert torch.equal(dropout.eval()(x), x)


def test_setup_builds_lora_on_every_projection_with_cpu_dropout(
    base_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    config = make_config(base_model, chat_file, tmp_path / "out")
    run = trainer.setup(config)
    try:
        adapted = [m for m in run.model.modules() if hasattr(m, "lora_dropout")]
        assert len(adapted) == 7 * 2
        assert all(isinstance(m.lora_dropout["default"], CpuDropout) for m in adapted)
        assert all(hasattr(m, "_lean_group") for m in adapted)  # finetune.fast_lora's forward
        assert run.model.get_base_model().config._attn_implementation == PACKED_ATTENTION
    finally:
        trainer.cleanup(config.output_dir, run)


# --- configuration ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_epochs", 0),
        ("batch_size", 0),
        ("gradient_accumulation_steps", 0),
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("warmup_ratio", 1.0),
        ("lora_rank", 0),
        ("lora_alpha", 0),
        ("lora_dropout", 1.0),
        ("target_modules", ()),
        ("target_modules", ("q_proj", "lm_head")),
        ("quantization_bit", 3),
        ("max_seq_length", 0),
        ("max_tokens_per_batch", 8),
        ("save_steps", -1),
        ("eval_steps", 0),
        ("logging_steps", 0),
        ("device", "tpu"),
        ("training_file", Path("/nonexistent/train.jsonl")),
        ("validation_file", Path("/nonexistent/valid.jsonl")),
        ("base_model_path", Path("/nonexistent")),
    ],
)
def test_validate_names_the_field(base_model: Path, chat_file: Path, field: str, value: Any) -> None:
    config = make_config(base_model, chat_file, Path("/unused"))
    dataclasses.replace(config).validate()  # the defaults pass
    with pytest.raises(ValueError, match=rf"^{field}="):
        dataclasses.replace(config, **{field: value}).validate()


def test_every_field_documents_itself() -> None:
    for field in dataclasses.fields(TrainConfig):
        assert field.metadata.get("help"), field.name


def test_cuda_without_a_gpu_is_refused_early(base_model: Path, chat_file: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match=r"^device="):
        make_config(base_model, chat_file, Path("/unused"), device="cuda").validate()


def test_output_dir_is_private(base_model: Path, chat_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o755)
    os.chmod(out, 0o755)
    train(make_config(base_model, chat_file, out, n_epochs=1))
    assert stat.S_IMODE(out.stat().st_mode) == 0o700


# --- sealed at rest (privacy.encrypt_at_rest: the worker passes the data dir's cipher) ----------------------


def sealed_weights(cipher: FileCipher, directory: Path) -> dict[str, torch.Tensor]:
    return load_tensors(checkpoints.read_sealed(cipher, directory / "adapter_model.safetensors"))


def test_adapter_files_are_what_peft_save_pretrained_writes(
    base_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    config = make_config(base_model, chat_file, tmp_path / "out")
    run = trainer.setup(config)
    try:
        made = checkpoints.adapter_files(run.model)  # before save_pretrained, which edits the config
        run.model.save_pretrained(
            str(tmp_path / "peft"), safe_serialization=True, save_embedding_layers=False
        )
    finally:
        trainer.cleanup(config.output_dir, run)
    for name, data in made.items():
        assert data == (tmp_path / "peft" / name).read_bytes(), name


def test_sealed_checkpoints_resume_the_exact_curve_and_hold_no_plaintext(
    base_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    cipher = FileCipher(os.urandom(32))
    straight = Recorder()
    whole = train(make_config(base_model, chat_file, tmp_path / "straight"), straight, straight.should_stop)

    interrupted = Recorder(stop_after_micro_steps=5)  # cancelled during step 6, checkpoints at 2 and 4
    config = make_config(base_model, chat_file, tmp_path / "sealed", save_steps=2)
    with pytest.raises(TrainingCancelled):
        train(config, interrupted, interrupted.should_stop, sealer=cipher)
    written = [p for p in config.output_dir.rglob("*") if p.is_file()]
    assert len(written) == 2 * 4  # two checkpoints of four files; metrics.csv waits for the end
    for path in written:
        data = path.read_bytes()
        assert data.startswith(b"PGWENC"), path  # sealed: no safetensors header, tensor name or loss
        assert b"__metadata__" not in data and b"lora_A" not in data and b"fingerprint" not in data
    with pytest.raises(EncryptionError):  # without the key a sealed checkpoint is not read (nor skipped)
        train(config)

    resumed = Recorder()
    result = train(config, resumed, resumed.should_stop, sealer=cipher)  # resumes from sealed step-4
    assert resumed.of("started")[0]["resumed_from_step"] == 4
    assert interrupted.losses() == straight.losses()[:5]
    assert resumed.losses() == straight.losses()[4:]
    assert result.final_loss == whole.final_loss
    for key, value in adapter_weights(whole.adapter_dir).items():
        assert torch.equal(value, sealed_weights(cipher, result.adapter_dir)[key])
    csv = checkpoints.read_sealed(cipher, result.metrics_csv).decode()
    assert [line.split(",")[0] for line in csv.splitlines()[1:]] == [
        str(s) for s in range(1, whole.steps + 1)
    ]  # the rows before the interruption came back from the sealed checkpoint
    assert all(p.read_bytes().startswith(b"PGWENC") for p in config.output_dir.rglob("*") if p.is_file())
    assert_only_results_left(config.output_dir)


def test_a_tampered_sealed_checkpoint_is_refused(base_model: Path, chat_file: Path, tmp_path: Path) -> None:
    cipher = FileCipher(os.urandom(32))
    config = make_config(base_model, chat_file, tmp_path / "out", save_steps=4, n_epochs=1)
    train(config, sealer=cipher)
    state = config.output_dir / "checkpoints" / "step-4" / "trainer_state.pt"
    data = bytearray(state.read_bytes())
    data[-40] ^= 1
    state.write_bytes(bytes(data))
    with pytest.raises(TamperedError):
        train(dataclasses.replace(config, resume_from=state.parent), sealer=cipher)
