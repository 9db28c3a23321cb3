"""Which number formats the engine computes in on this hardware: the weight/KV-cache dtype and whether a
quantized copy of the weights serves small decode steps (see quantized.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from gateway.core.errors import EngineFailure
from gateway.engine.local.quantized import Scheme

__all__ = ["resolve_dtype", "resolve_quantization"]


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` picks bf16 where the hardware computes it natively (CUDA, or CPUs with AVX512-BF16/AMX),
    since decoding is bound by the bytes of weights read per token; fp32 elsewhere."""
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


def resolve_quantization(name: str, dtype: torch.dtype, model_dir: Path) -> Scheme | None:
    """`auto` quantizes the decode copy only as far as the GGUF the model came from already was (so it loses
    nothing new), and only where the kernels are fast: bf16 on the CPU."""
    if name == "none":
        return None
    if name != "auto":
        if dtype != torch.bfloat16 or torch.cuda.is_available():
            raise EngineFailure(f"engine.quantization = {name} needs models.dtype bfloat16 on the CPU")
        return "int4" if name == "int4" else "int8"
    if dtype != torch.bfloat16 or torch.cuda.is_available():
        return None
    from contracts.base_models import gguf_weight_bits

    bits = gguf_weight_bits(model_dir)
    if bits is None or bits > 8:
        return None
    return "int4" if bits <= 4 else "int8"
