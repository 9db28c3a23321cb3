"""A lean forward for peft's LoRA Linear layers: the projections that read one input share its LoRA work.

peft computes, for each adapted projection on its own,

    y = W x + (B (A dropout(x))) * scaling

which costs, besides the two small matmuls, a dropout mask drawn from torch's generator, a full-size multiply
for the mask, one for `scaling` and one add, per projection.  `install` swaps that forward, on the layers
whose base is a plain nn.Linear (QLoRA's bitsandbytes layers keep peft's), for one that

- draws one dropout mask per *input*: q/k/v read the same hidden states, and so do gate/up, so they share
  one mask (same keep-probability per element as peft's, the masks are merely the same across the
  projections of one input) and one matmul against their A matrices stacked ([A_q; A_k; A_v]);
- draws the mask as 16-bit integers, four per 64-bit draw of torch's generator (checkpoints already save
  its state, so resuming stays exact), instead of one double-precision bernoulli per element;
- folds `scaling` and the dropout's 1 / (1 - p) into one `addmm` onto the base output: no multiply, no add.

With dropout 0 it is the same function as peft's (tests/unit/test_fast_lora.py holds logits and gradients
to peft at fp32 rounding); the parameters, their names and the saved adapter are peft's own.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["SHARED_INPUTS", "install", "keep_mask"]

# Sibling projections the model calls on the same input tensor (Llama-family attention and MLP).
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

_INT16_VALUES = 1 << 16


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A boolean keep-mask (each element kept with probability 1 - p') and the p' it was drawn with.

    p' is p rounded to a multiple of 1/65536 (|p' - p| <= 8e-6); the caller rescales by 1 / (1 - p').
    """
    count = 1
    for size in shape:
        count *= size
    drop_below = round(p * _INT16_VALUES) - (_INT16_VALUES // 2)  # int16 values below this are dropped
    words = torch.randint(-(2**63), 2**63 - 1, ((count + 3) // 4,), dtype=torch.int64, device=device)
    mask = words.view(torch.int16)[:count].ge(drop_below).view(shape)
    return mask, round(p * _INT16_VALUES) / _INT16_VALUES


class _Group:
    """The LoRA work the projections reading one input share: the dropped input times their stacked A."""

    def __init__(self, members: list[Any], adapter: str) -> None:
        self.members, self.adapter = members, adapter
        self.ranks = [m.lora_A[adapter].weight.shape[0] for m in members]
        self.offsets = [sum(self.ranks[:i]) for i in range(len(members))]
        first = members[0]
        self.scaling = float(first.scaling[adapter])
        dropout = first.lora_dropout[adapter]
        self.p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0
        self._input: torch.Tensor | None = None
        self._projected: torch.Tensor | None = None
        self._alpha = self.scaling
        self._used: set[int] = set()

    def projected(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(dropout(x) @ A_index^T as rows, the factor for B) for member `index`; computed once per input."""
        if self._input is not x or index in self._used:
            self._compute(x)
        self._used.add(index)
        assert self._projected is not None
        start = self.offsets[index]
        rows = self._projected[:, start : start + self.ranks[index]]
        alpha = self._alpha
        if len(self._used) == len(self.members):  # every member has its share: hold no activations
            self._input = self._projected = None
        return rows, alpha

    def _compute(self, x: torch.Tensor) -> None:
        weights = [m.lora_A[self.adapter].weight for m in self.members]
        stacked = weights[0] if len(weights) == 1 else torch.cat(weights)
        rows = x.reshape(-1, x.shape[-1])
        self._alpha = self.scaling
        if self.members[0].training and self.p > 0:
            mask, p = keep_mask(rows.shape, self.p, rows.device)
            rows = rows * mask
            self._alpha = self.scaling / (1 - p)
        if rows.dtype != stacked.dtype and not torch.is_autocast_enabled(rows.device.type):
            rows = rows.to(stacked.dtype)
        self._input, self._projected, self._used = x, rows @ stacked.t(), set()


def _lean_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    group: _Group = self._lean_group
    if args or kwargs or self.disable_adapters or self.merged or self.active_adapters != [group.adapter]:
        return type(self).forward(self, x, *args, **kwargs)  # anything unusual: peft's own path
    base = self.base_layer
    result = F.linear(x, base.weight, base.bias)
    rows, alpha = group.projected(self._lean_index, x)
    flat = result.reshape(-1, result.shape[-1])
    weight_b = self.lora_B[group.adapter].weight
    if flat.dtype != weight_b.dtype and not torch.is_autocast_enabled(flat.device.type):
        flat, rows = flat.to(weight_b.dtype), rows.to(weight_b.dtype)
    out = torch.addmm(flat, rows, weight_b.t(), alpha=alpha)
    return out.view(*result.shape[:-1], out.shape[-1]).to(result.dtype)


def install(peft_model: Any) -> int:
    """Give every plain-Linear LoRA layer of `peft_model` the lean forward; returns how many got it."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    installed = 0
    for parent in peft_model.modules():
        children = {
            name: child
            for name, child in parent.named_children()
            if isinstance(child, LoraLinear) and _plain(child)
        }
        if not children:
            continue
        groups = [[name for name in names if name in children] for names in SHARED_INPUTS]
        grouped = {name for group in groups for name in group}
        groups = [g for g in groups if g] + [[name] for name in children if name not in grouped]
        for names in groups:
            for group in _compatible(children[name] for name in names):
                for index, member in enumerate(group.members):
                    member._lean_group, member._lean_index = group, index
                    member.forward = types.MethodType(_lean_forward, member)
                    installed += 1
    return installed


def _plain(layer: Any) -> bool:
    """One vanilla LoRA adapter (no DoRA or other variant) on a plain nn.Linear."""
    adapters = list(layer.lora_A.keys())
    return (
        type(layer.base_layer) is torch.nn.Linear
        and len(adapters) == 1
        and not layer.lora_variant
        and not getattr(layer, "fan_in_fan_out", False)
    )


def _compatible(layers: Any) -> list[_Group]:
    """Members sharing an input share a group only when their scaling and dropout agree."""
    layers = list(layers)
    adapter = next(iter(layers[0].lora_A.keys()))

    def key(layer: Any) -> tuple[float, float]:
        dropout = layer.lora_dropout[adapter]
        return float(layer.scaling[adapter]), float(getattr(dropout, "p", 0.0))

    if all(key(layer) == key(layers[0]) for layer in layers):
        return [_Group(layers, adapter)]
    return [_Group([layer], adapter) for layer in layers]
