"""Weight-only quantized copies of the linear weights, for the engine steps that read weights, not compute.

A decode step with one or two sequences multiplies a handful of rows by every weight matrix: its time is the
bytes of weights read (bandwidth-bound), so 4-bit weights read a quarter of what bf16 weights read.  torch's
CPU kernels for this (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`) are the ones torchao and
gpt-fast use; they are fast only with bf16 activations and only for a few rows (their time grows with the
rows, while a dense GEMM's barely does), so the runner keeps the dense weights for prefill and busy batches
and uses these below `max_rows`.

- int4: asymmetric, one scale and zero per group of 32 input columns (the layout of GGUF Q4_0/Q4_1, so a
  model converted from a 4-bit GGUF loses nothing it had not already lost).
- int8: symmetric, one scale per output row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

__all__ = ["GROUP_SIZE", "Int4Weight", "Int8Weight", "QuantizedWeight", "Scheme", "quantize"]

Scheme = Literal["int4", "int8"]
GROUP_SIZE = 32


class QuantizedWeight(Protocol):
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] (bf16) @ W^T -> [rows, out] (bf16)."""
        ...


@dataclass(frozen=True)
class Int4Weight:
    packed: torch.Tensor  # torch's CPU int4 packing of [out, in]
    scales_and_zeros: torch.Tensor  # [in / GROUP_SIZE, out, 2] bf16: w = (q - 8) * scale + zero

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP_SIZE, self.scales_and_zeros)


@dataclass(frozen=True)
class Int8Weight:
    weight: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # bf16 [out]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)


def quantize(weight: torch.Tensor, scheme: Scheme) -> QuantizedWeight | None:
    """A quantized copy of a [out, in] weight, or None where the kernels cannot take its shape."""
    out_features, in_features = weight.shape
    w = weight.detach().float()
    if scheme == "int8":
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return Int8Weight(q.contiguous(), scales.to(torch.bfloat16))
    if in_features % GROUP_SIZE or out_features % 16:
        return None
    groups = w.reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(out_features, in_features), 8)
    zero = low + 8 * scale
    scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    return Int4Weight(packed, scales_and_zeros)
