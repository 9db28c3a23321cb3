"""finetune.fast_lora, the fused cross-entropy and the bf16 decision, held to peft / torch on a tiny Llama."""

# ruff: noqa: F811 - the fixtures imported from test_trainer are parameters here
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from contracts.lora import LORA_TARGET_MODULES
from finetune import fast_lora, lora_model, packed, trainer
from finetune.batches import pack
from finetune.packed import PACKED_ATTENTION, linear_cross_entropy, loss_sum
from tests.unit.test_trainer import (  # noqa: F401 - fixtures, used by name
    Recorder,
    base_model,
    chat_file,
    make_config,
    qa_examples,
    tokenizer,
)


def peft_pair(base_model: Path, dropout: float) -> tuple[Any, Any]:
    """Two identical peft models (random, non-zero B), the second with the lean forward installed."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        lora = LoraConfig(
            r=4, lora_dropout=dropout, target_modules=list(LORA_TARGET_MODULES), init_lora_weights=False
        )
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32), lora)
        model.get_base_model().set_attn_implementation(PACKED_ATTENTION)
        models.append(model)
    assert fast_lora.install(models[1]) == 7 * 2  # seven projections, two layers
    return models[0], models[1]


def test_lean_forward_is_peft_forward_logits_and_gradients(base_model: Path, tokenizer: Any) -> None:
    reference, lean = peft_pair(base_model, dropout=0.0)
    [batch] = pack(qa_examples(tokenizer, 4), max_tokens_per_batch=1024, seed=0)
    grads = []
    for model in (reference, lean):
        loss = loss_sum(model, batch, torch.device("cpu"))
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        with torch.no_grad():
            ids = torch.tensor([batch.input_ids[:20]])
            grads[-1]["logits"] = model(input_ids=ids, use_cache=False).logits
    assert len(grads[0]) == len(grads[1]) == 2 * 7 * 2 + 1
    for name, expected in grads[0].items():
        # addmm sums in another order than peft's mm, mul and add: fp32 rounding, nothing more.
        error = (grads[1][name] - expected).norm() / expected.norm()
        assert error < 1e-5, (name, error)


def test_projections_reading_one_input_share_a_group(base_model: Path) -> None:
    _, lean = peft_pair(base_model, dropout=0.1)
    layer = lean.get_base_model().model.layers[0]
    attention, mlp = layer.self_attn, layer.mlp
    assert attention.q_proj._lean_group is attention.k_proj._lean_group is attention.v_proj._lean_group
    assert [attention.q_proj._lean_index, attention.k_proj._lean_index, attention.v_proj._lean_index] == [
        0,
        1,
        2,
    ]
    assert mlp.gate_proj._lean_group is mlp.up_proj._lean_group
    assert attention.o_proj._lean_group.members == [attention.o_proj]
    assert mlp.down_proj._lean_group.members == [mlp.down_proj]


def test_dropout_is_drawn_in_training_only_and_is_reproducible(base_model: Path) -> None:
    reference, lean = peft_pair(base_model, dropout=0.3)
    ids = torch.tensor([[1, 5, 9, 12, 7, 3, 8, 2]])
    outputs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            outputs.append(lean(input_ids=ids, use_cache=False).logits)
    assert torch.equal(outputs[0], outputs[1])  # the mask comes from torch's generator: seeded, resumable
    assert not torch.allclose(outputs[0], outputs[2])
    reference.eval(), lean.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            lean(input_ids=ids, use_cache=False).logits,
            reference(input_ids=ids, use_cache=False).logits,
            rtol=1e-5,
            atol=1e-5,  # as test_trainer's packed logits: fp32 summation order
        )
    assert not torch.allclose(outputs[0], lean(input_ids=ids, use_cache=False).logits)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_keep_mask_keeps_one_minus_p(p: float) -> None:
    torch.manual_seed(0)
    mask, drawn_p = fast_lora.keep_mask(torch.Size([1000, 1001]), p, torch.device("cpu"))
    assert mask.dtype == torch.bool and mask.shape == (1000, 1001)
    assert abs(drawn_p - p) <= 8e-6
    assert mask.float().mean().item() == pytest.approx(1 - p, abs=0.002)


def test_linear_cross_entropy_is_cross_entropy_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    monkeypatch.setattr(packed, "_LOGITS_PER_CHUNK", 3 * 50)  # three rows per chunk: several chunks
    hidden = torch.randn(10, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (10,))
    loss = linear_cross_entropy(hidden, weight, targets)
    (2.0 * loss).backward()
    reference_hidden = hidden.detach().clone().requires_grad_()
    reference = F.cross_entropy(reference_hidden @ weight.t(), targets, reduction="sum")
    (2.0 * reference).backward()
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(hidden.grad, reference_hidden.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # validation: no gradient is computed, the loss is the same
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets), reference)


# --- bf16 where it is native --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [(False, False, torch.float32), (True, False, torch.bfloat16), (False, True, torch.bfloat16)],
)
def test_cpu_trains_in_bf16_only_where_bf16_is_native(
    monkeypatch: pytest.MonkeyPatch, amx: bool, avx512_bf16: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert lora_model.compute_dtype(torch.device("cpu")) == expected


@pytest.mark.parametrize(("supported", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_cuda_trains_in_bf16_where_supported(
    monkeypatch: pytest.MonkeyPatch, supported: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
    assert lora_model.compute_dtype(torch.device("cuda")) == expected


def test_bf16_run_keeps_fp32_master_lora_and_follows_the_fp32_curve(
    base_model: Path,
    chat_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bf16 forced on (emulated here, so slow but correct): base weights bf16, LoRA and AdamW state fp32.

    Tolerance: bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2% per operation); through two
    layers and a few steps the training loss stays within 3% of the fp32 run's.
    """
    losses = []
    for native in (False, True):
        monkeypatch.setattr(lora_model, "cpu_has_native_bf16", lambda native=native: native)
        config = make_config(base_model, chat_file, tmp_path / f"bf16-{native}", n_epochs=1, lora_dropout=0.0)
        if native:
            run = trainer.setup(config)
            try:
                base = run.model.get_base_model()
                assert base.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
                trainable = [p for p in run.model.parameters() if p.requires_grad]
                assert trainable and all(p.dtype == torch.float32 for p in trainable)
            finally:
                trainer.cleanup(config.output_dir, run)
        events = Recorder()
        trainer.train(config, events, events.should_stop)
        losses.append(events.losses())
    fp32, bf16 = losses
    assert len(fp32) == len(bf16) == 4
    for a, b in zip(fp32, bf16, strict=True):
        assert b == pytest.approx(a, rel=0.03)
