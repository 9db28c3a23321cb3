"""Settings -> a started engine for one base model.  The one place that knows which backend serves a model,
so a second backend joins here and nowhere else."""

from __future__ import annotations

from collections.abc import Callable

from contracts.base_models import prepare
from gateway.core.settings import Settings, auto_value
from gateway.engine.base import Engine

__all__ = ["EngineFactory", "build_engine"]

EngineFactory = Callable[[str], Engine]


def build_engine(settings: Settings, name: str) -> Engine:
    """Prepare (convert once if GGUF) and start the local engine for base model `name`.  Blocking."""
    from gateway.engine.local.engine import LocalEngine  # imports torch: only when an engine is built

    source = settings.models.sources()[name]
    engine = LocalEngine(
        name,
        lambda: prepare(name, source, settings.data_path),  # on the engine thread: converting uses torch
        dtype=settings.models.dtype,
        device=settings.engine.device,
        max_running=auto_value(settings.engine.max_running),
        max_queued=auto_value(settings.engine.max_queued),
        max_model_len=settings.models.max_model_len,
        prefill_token_budget=auto_value(settings.engine.prefill_token_budget),
        tenant_concurrency=auto_value(settings.limits.tenant_concurrency),
        memory_fraction=settings.engine.memory_fraction,
        default_max_tokens=settings.engine.default_max_tokens,
        max_adapters=settings.engine.max_adapters,
        threads=settings.engine.threads,
        quantization=settings.engine.quantization,
        quantized_max_rows=settings.engine.quantized_max_rows,
    )
    engine.start()
    return engine
