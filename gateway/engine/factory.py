"""Settings -> a started engine for one base model.  The one place that knows which backend serves a model
(engine.backend / engine.backends: local or vllm), so a backend joins here and nowhere else."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from contracts.base_models import prepare
from contracts.embedding_models import prepare_embedding_model
from gateway.core.settings import Settings, auto_value
from gateway.engine.base import Engine
from gateway.engine.embeddings import EmbeddingEngine

__all__ = [
    "EmbeddingEngineFactory",
    "EngineFactory",
    "build_embedding_engine",
    "build_engine",
    "build_vllm_engine",
]

EngineFactory = Callable[[str], Engine]
EmbeddingEngineFactory = Callable[[str], EmbeddingEngine]


def build_engine(settings: Settings, name: str) -> Engine:
    """Prepare (convert once if GGUF) and start the engine for base model `name`.  Blocking."""
    if settings.engine.backend_of(name) == "vllm":
        engine = build_vllm_engine(settings, name)
        engine.start()
        return engine
    from gateway.engine.local.engine import LocalEngine  # imports torch: only when an engine is built

    source = settings.models.sources()[name]
    local = LocalEngine(
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
        quantized_max_rows=auto_value(settings.engine.quantized_max_rows),
    )
    local.start()
    return local


def build_vllm_engine(settings: Settings, name: str) -> Engine:
    """The vLLM engine for `name` (not started): remote replicas when vllm.replicas lists the model, else a
    managed server on loopback, one port per vllm-backed base model in configuration order."""
    from gateway.engine.vllm.engine import VllmEngine
    from gateway.engine.vllm.pool import ReplicaPool
    from gateway.engine.vllm.server import ManagedServer, server_command

    v = settings.vllm
    api_key = Path(v.api_key_file).read_text().strip() if v.api_key_file else ""
    server = None
    if v.remote(name):
        urls = v.replicas[name]
    else:
        managed = [
            m for m in settings.models.names() if settings.engine.backend_of(m) == "vllm" and not v.remote(m)
        ]
        port = v.port + managed.index(name)
        model_dir = prepare(name, settings.models.sources()[name], settings.data_path)
        command = server_command(
            v.python,
            model_dir,
            name,
            port=port,
            max_model_len=settings.models.max_model_len,
            max_loras=settings.engine.max_adapters,
            max_lora_rank=v.max_lora_rank,
            tensor_parallel_size=v.tensor_parallel_size,
            enable_lora=v.enable_lora,
            extra=v.args,
        )
        env = {"VLLM_API_KEY": api_key} if api_key else {}
        server = ManagedServer(name, command, settings.data_path / "logs" / f"vllm-{name}.log", env)
        urls = [f"http://127.0.0.1:{port}"]
    return VllmEngine(
        name,
        ReplicaPool(urls),
        server=server,
        api_key=api_key,
        max_model_len=settings.models.max_model_len,
        max_adapters=settings.engine.max_adapters,
        default_max_tokens=settings.engine.default_max_tokens,
        health_interval=v.health_interval_seconds,
        connect_timeout=v.connect_timeout_seconds,
        retry_after=v.retry_after_seconds,
        startup_timeout=v.startup_timeout_seconds,
    )


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
