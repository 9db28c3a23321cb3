"""The model a run trains: the frozen base (full precision, or NF4 / LLM.int8 for QLoRA) with LoRA adapters.

Kept apart from the loop because building it is where the device, the dtype, bitsandbytes and peft meet, and
none of that changes while training runs.  The base is switched to the packed attention of finetune.packed,
its plain-Linear LoRA layers get finetune.fast_lora's lean forward, and on a CPU the dropout modules peft's
own forward still uses (QLoRA's layers) are swapped for a cheaper one with the same distribution (CpuDropout).
The base is bf16 where the device computes bf16 natively (compute_dtype), fp32 elsewhere.
"""

from __future__ import annotations

from typing import Any

import torch

from contracts.base_models import load_model
from finetune import fast_lora
from finetune.config import TrainConfig
from finetune.packed import PACKED_ATTENTION

__all__ = ["CpuDropout", "build_model", "compute_dtype", "cpu_has_native_bf16", "pick_device"]


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":  # an explicit index: device_map, safetensors and the optimizer state all agree on it
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(choice)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU multiplies bf16 in hardware (elsewhere emulated, slower than fp32)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device computes it natively (CUDA with bf16, AVX512-BF16 / AMX CPUs), else fp32.

    In bf16 the frozen base weights are stored in bf16 and the forward runs under autocast, while the LoRA
    parameters, their gradients and AdamW's state stay fp32 (peft keeps adapters in fp32: master weights).
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def build_model(config: TrainConfig, device: torch.device) -> Any:
    from peft import LoraConfig, get_peft_model

    dtype = compute_dtype(device)
    if config.quantization_bit is None:
        model = load_model(config.base_model_path, dtype=dtype, device=str(device))
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = _load_quantized(config, device, dtype)
    model.set_attn_implementation(PACKED_ATTENTION)
    model.config.use_cache = False  # a cache would only cost memory in training
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    if device.type == "cpu":  # on CUDA torch's dropout is already a fused kernel
        for module in peft_model.modules():
            dropouts = getattr(module, "lora_dropout", None)
            if isinstance(dropouts, torch.nn.ModuleDict):
                for name, dropout in dropouts.items():
                    if isinstance(dropout, torch.nn.Dropout):
                        dropouts[name] = CpuDropout(dropout.p)
    fast_lora.install(peft_model)  # plain-Linear layers only: QLoRA's keep peft's forward
    peft_model.train()
    return peft_model


class CpuDropout(torch.nn.Dropout):
    """nn.Dropout's distribution at about a quarter of its cost on a CPU.

    torch's CPU dropout draws its mask with bernoulli_ in double precision and backpropagates through a
    division; a float uniform draw compared with p gives the same keep-probability.  LoRA applies dropout
    to the input of every adapted projection, so on a CPU this was a tenth of a whole training step.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return input
        keep = torch.rand_like(input).ge_(self.p).mul_(1 / (1 - self.p))
        return input * keep


def _load_quantized(config: TrainConfig, device: torch.device, dtype: torch.dtype) -> Any:
    """QLoRA: the frozen base in NF4 (4 bit, double-quantized) or LLM.int8 (8 bit); adapters stay in `dtype`.

    bitsandbytes >= 0.46 runs both on CPU too (slower than fp32 there: weights are dequantized per matmul).
    """
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if config.quantization_bit == 4:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(config.base_model_path),
        quantization_config=quantization,
        dtype=dtype,
        device_map={"": str(device)},
    )
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
