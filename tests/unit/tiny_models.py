"""The tiny random Llama the unit tests share: two layers, grouped-query attention, tied embeddings."""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig


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
