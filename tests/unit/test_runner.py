"""The engine's forward pass against transformers' own, on tiny random models.

Each test that holds the runner to transformers' logits runs on every device torch has here (`device`):
- cpu, fp32: exact to 1e-4 (the same math, in another order);
- cuda, bf16 (what the engine serves in there): weights and KV cache rounded once each to bf16's 8-bit
  mantissa (relative step 2^-8 ~ 0.4%) and attention in bf16 with fp32 accumulation, through two layers, so
  a logit may move by a few percent of the logits' range: held to 5% of it, the bound
  test_bf16_weights_stay_close_to_fp32 holds the CPU's bf16 to, and to the same greedy token.
The reference is always transformers in fp32 on the CPU.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from gateway.engine.local.lora import AdapterError, LoraAdapter
from gateway.engine.local.runner import (
    _SHORT_CONTEXT,
    ModelRunner,
    PrefillSegment,
    StepBatch,
    UnsupportedModel,
)
from tests.unit.tiny_models import save_peft_adapter, tiny_llama_config

torch.manual_seed(0)

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def on(device: str) -> dict[str, object]:
    """ModelRunner options for a device: the CPU in fp32 (exact), CUDA in bf16 (as served)."""
    return {} if device == "cpu" else {"device": device, "dtype": torch.bfloat16}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, device: str) -> None:
    actual = actual.float().cpu()
    if device == "cpu":
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
        return
    bound = 0.05 * float(expected.abs().max())
    assert float((actual - expected).abs().max()) <= bound, (actual - expected).abs().max()
    top2 = expected.topk(2).values
    if float(top2[0] - top2[1]) > 2 * bound:  # a clear winner: bf16 must pick it too
        assert int(actual.argmax()) == int(expected.argmax())


def tiny_llama(**overrides: object) -> LlamaForCausalLM:
    config = tiny_llama_config(128, **overrides)
    return LlamaForCausalLM(config).eval()


def reference_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def test_prefill_then_decode_matches_transformers(device: str) -> None:
    model = tiny_llama()
    runner = ModelRunner(model, max_slots=4, max_model_len=64, **on(device))
    ids = [5, 17, 33, 2, 90, 11]
    ref = reference_logits(model, ids)
    logits = runner.step(StepBatch(prefills=[PrefillSegment(slot=0, start=0, token_ids=ids[:4])]))
    assert_matches(logits[0], ref[3], device)
    for pos in (4, 5):
        logits = runner.step(
            StepBatch(
                decode_slots=[0], decode_tokens=[ids[pos]], decode_positions=[pos], decode_adapters=[None]
            )
        )
        assert_matches(logits[0], ref[pos], device)


def test_a_lone_row_past_the_short_context_decodes_like_transformers(device: str) -> None:
    """Past _SHORT_CONTEXT a lone decode row takes the batched-matmul attention instead of SDPA."""
    model = tiny_llama()
    runner = ModelRunner(model, max_slots=2, max_model_len=256, **on(device))
    ids = [(7 * i) % 120 + 1 for i in range(_SHORT_CONTEXT + 8)]
    ref = reference_logits(model, ids)
    runner.step(StepBatch(prefills=[PrefillSegment(slot=0, start=0, token_ids=ids[:-2])]))
    for pos in (len(ids) - 2, len(ids) - 1):
        logits = runner.step(
            StepBatch(
                decode_slots=[0], decode_tokens=[ids[pos]], decode_positions=[pos], decode_adapters=[None]
            )
        )
        assert_matches(logits[0], ref[pos], device)


def test_mixed_step_decode_rows_and_chunked_prefill(device: str) -> None:
    model = tiny_llama()
    runner = ModelRunner(model, max_slots=4, max_model_len=64, **on(device))
    a, b = [1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4, 3]
    ref_a, ref_b = reference_logits(model, a), reference_logits(model, b)
    runner.step(StepBatch(prefills=[PrefillSegment(slot=0, start=0, token_ids=a[:4])]))
    # one step: a decodes its 5th token while b's prompt arrives in a first chunk (no logits wanted)
    logits = runner.step(
        StepBatch(
            decode_slots=[0],
            decode_tokens=[a[4]],
            decode_positions=[4],
            decode_adapters=[None],
            prefills=[PrefillSegment(slot=1, start=0, token_ids=b[:3], wants_logits=False)],
        )
    )
    assert logits.shape[0] == 1
    assert_matches(logits[0], ref_a[4], device)
    # the rest of b's prompt continues from position 3, attending to the cached chunk
    logits = runner.step(StepBatch(prefills=[PrefillSegment(slot=1, start=3, token_ids=b[3:])]))
    assert_matches(logits[0], ref_b[-1], device)


def test_moving_a_slot_keeps_its_cache(device: str) -> None:
    model = tiny_llama()
    runner = ModelRunner(model, max_slots=4, max_model_len=64, **on(device))
    ids = [3, 1, 4, 1, 5]
    ref = reference_logits(model, ids)
    runner.step(StepBatch(prefills=[PrefillSegment(slot=2, start=0, token_ids=ids[:4])]))
    runner.move_slot(2, 0, 4)
    logits = runner.step(
        StepBatch(decode_slots=[0], decode_tokens=[ids[4]], decode_positions=[4], decode_adapters=[None])
    )
    assert_matches(logits[0], ref[4], device)


def test_cache_grows_past_its_first_capacity(device: str) -> None:
    model = tiny_llama()
    runner = ModelRunner(model, max_slots=2, max_model_len=256, **on(device))
    ids = list(range(1, 100)) * 3  # 297 tokens > the initial 256-token capacity
    ids = ids[:255]
    logits = runner.step(StepBatch(prefills=[PrefillSegment(slot=1, start=0, token_ids=ids)]))
    assert_matches(logits[0], reference_logits(model, ids)[-1], device)


def tiny_qwen_config(config_class: type, **extra: object) -> object:
    """Two layers, grouped-query attention, untied embeddings: what Qwen2/Qwen3 ship."""
    return config_class(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        **extra,
    )


def test_qwen2_with_qkv_bias(device: str) -> None:
    model = Qwen2ForCausalLM(tiny_qwen_config(Qwen2Config)).eval()
    runner = ModelRunner(model, max_slots=2, max_model_len=64, **on(device))
    ids = [4, 8, 15, 16, 23, 42]
    logits = runner.step(StepBatch(prefills=[PrefillSegment(slot=0, start=0, token_ids=ids)]))
    assert_matches(logits[0], reference_logits(model, ids)[-1], device)


def test_qwen3_with_qk_norms_decodes_two_rows_like_transformers(device: str) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = Qwen3ForCausalLM(tiny_qwen_config(Qwen3Config, head_dim=16)).eval()
    with torch.no_grad():  # random q/k norm weights, so a norm applied to the wrong heads shows
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    runner = ModelRunner(model, max_slots=2, max_model_len=64, **on(device))
    a, b = [4, 8, 15, 16, 23, 42], [7, 1, 3, 9, 2, 5, 11]
    ref_a, ref_b = reference_logits(model, a), reference_logits(model, b)
    runner.step(StepBatch(prefills=[PrefillSegment(slot=0, start=0, token_ids=a[:4])]))
    runner.step(StepBatch(prefills=[PrefillSegment(slot=1, start=0, token_ids=b[:5])]))
    for step in range(2):  # two rows of different lengths in one step: the batched decode attention
        logits = runner.step(
            StepBatch(
                decode_slots=[0, 1],
                decode_tokens=[a[4 + step], b[5 + step]],
                decode_positions=[4 + step, 5 + step],
                decode_adapters=[None, None],
            )
        )
        assert_matches(logits[0], ref_a[4 + step], device)
        assert_matches(logits[1], ref_b[5 + step], device)


def test_unsupported_architecture_is_refused() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(UnsupportedModel):
        ModelRunner(
            GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)),
            max_slots=1,
            max_model_len=16,
        )


def test_bf16_weights_stay_close_to_fp32() -> None:
    model = tiny_llama()
    runner = ModelRunner(model, max_slots=1, max_model_len=32, dtype=torch.bfloat16)
    ids = [7, 3, 9, 1]
    logits = runner.step(StepBatch(prefills=[PrefillSegment(slot=0, start=0, token_ids=ids)]))
    ref = reference_logits(model, ids)[-1]
    assert logits.dtype == torch.float32
    assert (logits[0] - ref).abs().max() < 0.05 * ref.abs().max()


def test_lora_rows_match_peft_and_mix_with_base_rows(tmp_path: Path, device: str) -> None:
    base = tiny_llama()
    runner = ModelRunner(base, max_slots=4, max_model_len=64, **on(device))
    peft_model = save_peft_adapter(copy.deepcopy(base), tmp_path / "adapter", seed=1)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    adapter = LoraAdapter.load("ft", tmp_path / "adapter", num_layers=2, dtype=dtype, device=device)
    assert adapter.num_modules == 14

    ids = [10, 20, 30, 40]
    with torch.inference_mode():
        tuned = peft_model(torch.tensor([ids])).logits[0, -1]
    plain = reference_logits(base, ids)[-1]
    logits = runner.step(
        StepBatch(
            prefills=[
                PrefillSegment(slot=0, start=0, token_ids=ids, adapter=adapter),
                PrefillSegment(slot=1, start=0, token_ids=ids, adapter=None),
            ]
        )
    )
    assert_matches(logits[0], tuned, device)
    assert_matches(logits[1], plain, device)
    assert (tuned - plain).abs().max() > 1e-2


def test_adapter_for_another_model_is_refused(tmp_path: Path) -> None:
    save_peft_adapter(tiny_llama(), tmp_path / "adapter", seed=2)
    with pytest.raises(AdapterError):
        LoraAdapter.load("x", tmp_path / "adapter", num_layers=1, dtype=torch.float32)
    with pytest.raises(AdapterError):
        LoraAdapter.load("x", tmp_path / "missing", num_layers=2, dtype=torch.float32)


def test_the_cuda_attention_path_is_exact_where_it_can_run_here() -> None:
    """The CUDA branches (grouped-query SDPA for decode with a boolean mask, expanded KV heads and
    lower-right causal prefill chunks) are device-independent torch: run on the CPU in fp32 they must be
    exact, so their arithmetic is checked on every CI run, GPU or not."""
    model = Qwen2ForCausalLM(tiny_qwen_config(Qwen2Config)).eval()
    runner = ModelRunner(model, max_slots=3, max_model_len=64)
    runner.on_cuda = True  # the GPU's code path, on the CPU's tensors
    a, b = [4, 8, 15, 16, 23, 42, 7], [9, 1, 3, 9, 2, 5, 11, 13]
    ref_a, ref_b = reference_logits(model, a), reference_logits(model, b)
    runner.step(StepBatch(prefills=[PrefillSegment(slot=0, start=0, token_ids=a[:3])]))
    logits = runner.step(StepBatch(prefills=[PrefillSegment(slot=0, start=3, token_ids=a[3:5])]))
    torch.testing.assert_close(logits[0], ref_a[4], atol=1e-4, rtol=1e-4)  # a chunk after a chunk
    runner.step(StepBatch(prefills=[PrefillSegment(slot=1, start=0, token_ids=b[:6])]))
    for step in range(2):  # two rows of different lengths: the masked grouped decode
        logits = runner.step(
            StepBatch(
                decode_slots=[0, 1],
                decode_tokens=[a[5 + step], b[6 + step]],
                decode_positions=[5 + step, 6 + step],
                decode_adapters=[None, None],
            )
        )
        torch.testing.assert_close(logits[0], ref_a[5 + step], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits[1], ref_b[6 + step], atol=1e-4, rtol=1e-4)
    lone = Qwen2ForCausalLM(tiny_qwen_config(Qwen2Config)).eval()
    single = ModelRunner(lone, max_slots=1, max_model_len=64)
    single.on_cuda = True
    ref = reference_logits(lone, a)
    single.step(StepBatch(prefills=[PrefillSegment(slot=0, start=0, token_ids=a[:6])]))
    logits = single.step(  # a lone row: unmasked SDPA
        StepBatch(decode_slots=[0], decode_tokens=[a[6]], decode_positions=[6], decode_adapters=[None])
    )
    torch.testing.assert_close(logits[0], ref[6], atol=1e-4, rtol=1e-4)
