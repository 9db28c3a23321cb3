"""Weight-only quantized decode weights: the kernels, the runner's use of them, and when `auto` picks them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from contracts.base_models import embedded_gguf, gguf_weight_bits, prepare
from gateway.core.errors import EngineFailure
from gateway.engine.local.precision import (
    resolve_device,
    resolve_dtype,
    resolve_quantization,
    resolve_quantized_max_rows,
)
from gateway.engine.local.quantized import GROUP_SIZE, Int4Weight, Int8Weight, quantize
from gateway.engine.local.runner import ModelRunner, PrefillSegment, StepBatch, UnsupportedModel
from tests.unit.tiny_models import tiny_llama_config

torch.manual_seed(0)


def four_bit_weight(out_features: int, in_features: int) -> torch.Tensor:
    """A weight that is already 4-bit in groups of 32 (as a GGUF Q4_1 file stores it): d * q + m."""
    q = torch.randint(0, 16, (out_features, in_features // GROUP_SIZE, GROUP_SIZE))
    q[..., 0], q[..., 1] = 0, 15  # every group spans the full range, as Q4_1's own min/scale make it
    d = torch.rand(out_features, in_features // GROUP_SIZE, 1) * 0.02 + 0.001
    m = -8 * d + torch.randn(out_features, in_features // GROUP_SIZE, 1) * 0.001
    return (d * q + m).reshape(out_features, in_features)


def test_int4_reproduces_a_four_bit_weight_as_closely_as_bf16_does() -> None:
    weight = four_bit_weight(96, 128)
    x = torch.randn(3, 128)
    exact = F.linear(x, weight)
    packed = quantize(weight, "int4")
    assert isinstance(packed, Int4Weight)
    got = packed.matmul(x.to(torch.bfloat16)).float()
    bf16 = F.linear(x.to(torch.bfloat16), weight.to(torch.bfloat16)).float()
    assert (got - exact).abs().max() <= 2 * (bf16 - exact).abs().max() + 1e-3


def test_int8_rows_stay_within_a_percent() -> None:
    weight = torch.randn(64, 96)
    x = torch.randn(2, 96)
    packed = quantize(weight, "int8")
    assert isinstance(packed, Int8Weight)
    got = packed.matmul(x.to(torch.bfloat16)).float()
    exact = F.linear(x, weight)
    assert (got - exact).abs().max() < 0.02 * exact.abs().max()


def test_int4_declines_shapes_its_kernel_cannot_take() -> None:
    assert quantize(torch.randn(64, 40), "int4") is None  # in_features not a multiple of the group
    assert quantize(torch.randn(40, 64), "int4") is None  # out_features not a multiple of 16


def _decode(runner: ModelRunner, ids: list[int], steps: list[int]) -> list[torch.Tensor]:
    out = [runner.step(StepBatch(prefills=[PrefillSegment(slot=0, start=0, token_ids=ids)]))[0]]
    for offset, token in enumerate(steps):
        position = len(ids) + offset
        batch = StepBatch(
            decode_slots=[0], decode_tokens=[token], decode_positions=[position], decode_adapters=[None]
        )
        out.append(runner.step(batch)[0])
    return out


def test_runner_uses_the_quantized_copy_for_small_steps_only() -> None:
    model = LlamaForCausalLM(tiny_llama_config(128)).eval()
    ids, steps = [5, 17, 33, 2, 90, 11], [4, 8, 15]
    dense = _decode(ModelRunner(model, max_slots=1, max_model_len=32, dtype=torch.bfloat16), ids, steps)
    quantized_runner = ModelRunner(
        model, max_slots=1, max_model_len=32, dtype=torch.bfloat16, quantization="int4", quantized_max_rows=4
    )
    assert all(set(layer.compact) == {"qkv", "o", "gate_up", "down"} for layer in quantized_runner.layers)
    quantized = _decode(quantized_runner, ids, steps)
    # the 6-token prefill is over quantized_max_rows: dense weights, the very same logits
    torch.testing.assert_close(quantized[0], dense[0])
    for q, d in zip(quantized[1:], dense[1:], strict=True):  # one-row decode steps: the int4 copy
        assert not torch.equal(q, d)
        assert (q - d).abs().max() < 0.1 * d.abs().max()


def test_an_fp32_runner_uses_the_quantized_copy_for_small_steps_too() -> None:
    """A CPU without native bf16 serves fp32 weights; its small steps still read the int4 copy (bf16
    activations in, fp32 out), its big ones the very same fp32 weights as without it."""
    model = LlamaForCausalLM(tiny_llama_config(128)).eval()
    ids, steps = [5, 17, 33, 2, 90, 11], [4, 8, 15]
    dense = _decode(ModelRunner(model, max_slots=1, max_model_len=32), ids, steps)
    runner = ModelRunner(model, max_slots=1, max_model_len=32, quantization="int4", quantized_max_rows=4)
    quantized = _decode(runner, ids, steps)
    assert all(q.dtype == torch.float32 for q in quantized)
    torch.testing.assert_close(quantized[0], dense[0])  # the prefill: over quantized_max_rows
    for q, d in zip(quantized[1:], dense[1:], strict=True):
        assert not torch.equal(q, d)
        assert (q - d).abs().max() < 0.1 * d.abs().max()


def test_runner_refuses_quantization_without_bf16_or_fp32() -> None:
    model = LlamaForCausalLM(tiny_llama_config(128)).eval()
    with pytest.raises(UnsupportedModel, match="bfloat16 or float32"):
        ModelRunner(model, max_slots=1, max_model_len=16, dtype=torch.float16, quantization="int4")


def _converted_dir(tmp_path: Path, **marker: object) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "gateway-ready.json").write_text(json.dumps(marker))
    return tmp_path


def test_auto_quantizes_only_as_far_as_the_source_gguf(tmp_path: Path) -> None:
    bf16, fp32 = torch.bfloat16, torch.float32
    four = _converted_dir(tmp_path / "q4", source="x.gguf", weight_bits=4)
    eight = _converted_dir(tmp_path / "q8", source="x.gguf", weight_bits=8)
    half = _converted_dir(tmp_path / "f16", source="x.gguf", weight_bits=16)
    plain = tmp_path / "plain"  # a transformers directory: no conversion marker
    plain.mkdir()
    assert resolve_quantization("auto", bf16, four) == "int4"
    assert resolve_quantization("auto", bf16, eight) == "int8"
    assert resolve_quantization("auto", bf16, half) is None
    assert resolve_quantization("auto", bf16, plain) is None
    assert resolve_quantization("auto", fp32, four) == "int4"  # bf16 activations into the kernel
    assert resolve_quantization("auto", fp32, plain) is None
    assert resolve_quantization("none", bf16, four) is None
    assert resolve_quantization("int8", bf16, plain) == "int8"
    assert resolve_quantization("int4", fp32, plain) == "int4"
    with pytest.raises(EngineFailure, match="bfloat16 or float32"):
        resolve_quantization("int4", torch.float16, plain)


def test_gguf_weight_bits_reads_the_embedded_model_once(tmp_path: Path) -> None:
    gguf = embedded_gguf()
    target = _converted_dir(tmp_path / "m", source=str(gguf.resolve()))
    assert gguf_weight_bits(target) == 4  # SmolLM2's layers are Q4_1
    assert json.loads((target / "gateway-ready.json").read_text())["weight_bits"] == 4  # kept for next time
    assert gguf_weight_bits(_converted_dir(tmp_path / "gone", source=str(tmp_path / "missing.gguf"))) is None


def test_a_marker_with_the_cached_bits_still_counts_as_converted(tmp_path: Path) -> None:
    gguf = embedded_gguf()
    stat = gguf.stat()
    target = tmp_path / "models" / "smol"
    stamp = {"source": str(gguf.resolve()), "size": stat.st_size, "mtime": int(stat.st_mtime)}
    _converted_dir(target, **stamp, weight_bits=4)
    assert prepare("smol", gguf, tmp_path) == target  # no 40 s reconversion because of the extra key
    assert not (target / "config.json").exists()


def test_on_cuda_auto_skips_the_cpu_kernels_and_explicit_int4_is_refused(tmp_path: Path) -> None:
    cuda = torch.device("cuda", 0)  # a device object: nothing is allocated on it
    four = _converted_dir(tmp_path / "q4", source="x.gguf", weight_bits=4)
    assert resolve_quantization("auto", torch.bfloat16, four, cuda) is None
    assert resolve_quantization("auto", torch.bfloat16, four, torch.device("cpu")) == "int4"
    with pytest.raises(EngineFailure, match="on the CPU"):
        resolve_quantization("int4", torch.bfloat16, four, cuda)


def test_device_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(EngineFailure, match="sees no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(EngineFailure, match="must be one of"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16  # whatever this CPU has
    assert resolve_dtype("float32", torch.device("cuda", 0)) == torch.float32


def test_quantized_max_rows_auto_is_the_crossover_for_the_weights_dtype() -> None:
    assert resolve_quantized_max_rows(None, torch.bfloat16) == 16
    assert resolve_quantized_max_rows(None, torch.float32) == 12  # AVX2: int4 loses to dense fp32 at 16
    assert resolve_quantized_max_rows(4, torch.float32) == 4  # configured: kept
