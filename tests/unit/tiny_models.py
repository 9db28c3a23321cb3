"""The tiny random Llama the unit tests share (two layers, grouped-query attention, tied embeddings) and a
LoRA adapter for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(vocab_size: int, **overrides: Any) -> LlamaConfig:
    settings: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    }
    settings.update(overrides)
    return LlamaConfig(**settings)


def save_peft_adapter(model: LlamaForCausalLM, out: Path, seed: int) -> LlamaForCausalLM:
    """Save to `out` a peft LoRA adapter on every projection of `model`; B is nonzero so it acts."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            lora_dropout=0.0,
        ),
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; make the adapter do something
                param.normal_(0, 0.2)
    peft_model.save_pretrained(out)
    return peft_model.eval()
