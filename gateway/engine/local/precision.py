"""Where and in which number formats the engine computes on this hardware: the device (CPU or CUDA), the
weight/KV-cache dtype and whether a quantized copy of the weights serves small decode steps (quantized.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from gateway.core.errors import EngineFailure
from gateway.engine.local.quantized import Scheme

__all__ = ["DEVICES", "resolve_device", "resolve_dtype", "resolve_quantization", "resolve_quantized_max_rows"]

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """`auto` is the first CUDA device where torch sees one, else the CPU; `cuda` without one is a clear
    start-up error, not a silent fall back to CPU speed."""
    if name not in DEVICES:
        raise EngineFailure(f"engine.device must be one of {', '.join(DEVICES)}, not {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise EngineFailure("engine.device = cuda, but torch sees no CUDA device (set auto or cpu)")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """`auto` picks bf16 where the hardware computes it natively (CUDA, or CPUs with AVX512-BF16/AMX),
    since decoding is bound by the bytes of weights read per token; fp32 elsewhere.  The device decides
    (a CPU-configured engine on a machine with a GPU asks its CPU), the CPU when none is given."""
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if device is not None and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


def resolve_quantization(
    name: str, dtype: torch.dtype, model_dir: Path, device: torch.device | None = None
) -> Scheme | None:
    """`auto` quantizes the decode copy only as far as the GGUF the model came from already was (so it loses
    nothing new), and only where the kernels are: the CPU, with bf16 or fp32 weights (torch's int4/int8
    packed kernels used here are CPU kernels taking bf16 activations, which fp32 steps round to; on CUDA
    `auto` skips them and serves the bf16 weights).  On a CPU without native bf16 (fp32 weights) the int4
    copy is what keeps a small step from reading 4 bytes per weight: one stream 17 -> 30+ tok/s here."""
    on_cpu = device is None or device.type == "cpu"
    usable = dtype in (torch.bfloat16, torch.float32) and on_cpu
    if name == "none":
        return None
    if name != "auto":
        if not usable:
            raise EngineFailure(
                f"engine.quantization = {name} needs models.dtype bfloat16 or float32 on the CPU "
                "(engine.device cpu); set engine.quantization = auto or none on CUDA"
            )
        return "int4" if name == "int4" else "int8"
    if not usable:
        return None
    from contracts.base_models import gguf_weight_bits

    bits = gguf_weight_bits(model_dir)
    if bits is None or bits > 8:
        return None
    return "int4" if bits <= 4 else "int8"


# The largest step the quantized copy serves, where engine.quantized_max_rows is auto: the rows up to which
# the packed int4 kernel beats the dense weights, measured per layer of SmolLM2-135M on 2 cores.  With bf16
# weights (AVX-512-BF16/AMX CPUs) against dense bf16: 16.  With fp32 weights (no native bf16; AMD EPYC,
# AVX2) against dense fp32, ms per layer's four projections: 4 rows 0.41 vs 0.95, 8 rows 0.76 vs 0.96,
# 12 rows 1.12 vs 1.23, 16 rows 1.51 vs 1.30 (a whole 16-row step: 231 ms, slower than 32 dense rows).
QUANTIZED_MAX_ROWS = {torch.bfloat16: 16, torch.float32: 12}


def resolve_quantized_max_rows(value: int | None, dtype: torch.dtype) -> int:
    """engine.quantized_max_rows: as configured, or (None = auto) the crossover for the weights' dtype."""
    if value is not None:
        return value
    return QUANTIZED_MAX_ROWS.get(dtype, 16)
