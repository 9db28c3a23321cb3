"""LoRA adapters in the engine: read a peft adapter directory into per-layer (A, scaled B) pairs.

The engine applies adapters itself, per row of a batch, instead of wrapping the model with peft: that is what
lets sequences with different adapters (and none) share one forward pass.  The files are peft's own
(`adapter_config.json` + `adapter_model.safetensors`), so anything peft trains serves here unchanged.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from contracts.lora import LORA_TARGET_MODULES

__all__ = ["AdapterError", "LoraAdapter"]


_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class AdapterError(ValueError):
    """An adapter directory that cannot be served (missing files, other base model, DoRA, ...)."""


class LoraAdapter:
    def __init__(self, name: str, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.name = name
        self._weights = weights

    def get(self, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._weights.get((layer, module))

    @property
    def num_modules(self) -> int:
        return len(self._weights)

    @classmethod
    def load(
        cls,
        name: str,
        directory: Path,
        *,
        num_layers: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> LoraAdapter:
        config_path = directory / "adapter_config.json"
        weights_path = directory / "adapter_model.safetensors"
        if not config_path.is_file() or not weights_path.is_file():
            raise AdapterError(f"adapter {name!r}: adapter_config.json or adapter_model.safetensors missing")
        config = json.loads(config_path.read_text())
        if config.get("use_dora"):
            raise AdapterError(f"adapter {name!r}: DoRA adapters are not supported by the local engine")
        rank = int(config["r"])
        alpha = float(config.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        tensors = load_file(str(weights_path), device="cpu")
        halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            match = _KEY.search(key)
            if match is None:
                raise AdapterError(f"adapter {name!r}: unsupported weight {key}")
            layer, module, half = int(match[1]), match[2], match[3]
            if module not in LORA_TARGET_MODULES or layer >= num_layers:
                raise AdapterError(f"adapter {name!r}: weight {key} does not fit this base model")
            halves.setdefault((layer, module), {})[half] = tensor
        weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for place, pair in halves.items():
            if set(pair) != {"A", "B"}:
                raise AdapterError(f"adapter {name!r}: layer {place[0]} {place[1]} lacks lora_A or lora_B")
            a = pair["A"].to(device=device, dtype=dtype).contiguous()
            b = (pair["B"].float() * scale).to(device=device, dtype=dtype).contiguous()
            weights[place] = (a, b)
        if not weights:
            raise AdapterError(f"adapter {name!r}: no LoRA weights found")
        return cls(name, weights)
