"""The projections a LoRA adapter may target: the ones the serving engine applies adapters to
(gateway/engine/local/lora.py), so anything the trainer makes can be served.  "all-linear" means all.
"""

from __future__ import annotations

__all__ = ["LORA_TARGET_MODULES"]

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
