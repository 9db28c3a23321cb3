"""Embeddings: a request's inputs -> the embedding engine of its model -> the OpenAI list of vectors.

    input           a string, a list of strings, a list of token ids, or a list of lists of token ids (the
                    model's own ids, used as given: `tokenizer(text)["input_ids"]`, special tokens included,
                    gives the text's own vector); each input is one row of `data`, in order
    encoding_format float (JSON numbers) or base64 (little-endian float32 bytes, what the SDK asks for)
    dimensions      keep the first N components, renormalized to unit length when the model's vectors are
                    normalized (how OpenAI's text-embedding-3 shortens; models not trained for it, like
                    all-MiniLM-L6-v2, lose more quality per dropped component)
    usage           prompt_tokens = total_tokens = the tokens the model read, special tokens included

Engines start on first use, one per model, each on its own thread (gateway/engine/local/embedder.py).  The
audit record gets the token count; no input is logged or kept.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import structlog

from gateway.api.embeddings.protocol import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from gateway.api.models.registry import ModelRegistry
from gateway.core.errors import EngineUnavailable, InvalidRequest
from gateway.core.principal import Principal
from gateway.core.request_state import RequestState
from gateway.engine.embeddings import EmbeddingEngine, EmbeddingInputs
from gateway.engine.factory import EmbeddingEngineFactory

__all__ = ["EmbeddingEngines", "EmbeddingsService", "parse_inputs", "render"]

log = structlog.get_logger(__name__)

_SHAPES = "a string, a list of strings, a list of token ids or a list of lists of token ids"


class EmbeddingEngines:
    """One started embedding engine per model name, started on first use under a per-name lock."""

    def __init__(self, starter: EmbeddingEngineFactory, engines: dict[str, EmbeddingEngine] | None = None):
        self._starter = starter
        self._engines = dict(engines or {})
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, name: str) -> EmbeddingEngine:
        engine = self._engines.get(name)
        if engine is not None:
            return engine
        async with self._locks.setdefault(name, asyncio.Lock()):
            if name not in self._engines:
                try:
                    self._engines[name] = await asyncio.to_thread(self._starter, name)
                except Exception as exc:  # a missing wheel or a broken directory: the operator's to fix
                    log.error(
                        "embedder.start_failed",
                        model=name,
                        error_type=type(exc).__name__,
                        error=str(exc)[:200],
                    )
                    raise EngineUnavailable(f"The embedding model '{name}' could not be started.") from None
        return self._engines[name]

    def engines(self) -> list[EmbeddingEngine]:
        return list(self._engines.values())

    async def close(self) -> None:
        for engine in self._engines.values():
            await asyncio.to_thread(engine.shutdown)
        self._engines.clear()


class EmbeddingsService:
    def __init__(self, registry: ModelRegistry, engines: EmbeddingEngines, *, max_inputs: int = 2048) -> None:
        self._registry = registry
        self.engines = engines
        self._max_inputs = max_inputs

    async def create(self, req: EmbeddingRequest, principal: Principal, state: RequestState) -> bytes:
        """The encoded response body (an EmbeddingList)."""
        entry = self._registry.embedding_model(req.model, principal)
        inputs = await asyncio.to_thread(parse_inputs, req.input, self._max_inputs)
        engine = await self.engines.get(entry.base)
        dimensions = None
        if not isinstance(req.dimensions, msgspec.UnsetType):
            if not 1 <= req.dimensions <= engine.dimensions:
                raise InvalidRequest(
                    f"dimensions must be between 1 and {engine.dimensions} for the model '{req.model}'.",
                    param="dimensions",
                )
            dimensions = req.dimensions
        result = await engine.embed(inputs)
        state.record_usage(result.prompt_tokens, 0)
        return await asyncio.to_thread(
            render,
            result.vectors,
            model=entry.id,
            prompt_tokens=result.prompt_tokens,
            encoding_format=req.encoding_format,
            dimensions=dimensions,
            renormalize=engine.normalized,
        )


def parse_inputs(raw: str | list[Any], max_inputs: int) -> EmbeddingInputs:
    """The request's `input` as a list of strings or a list of token-id lists; 400 naming what is wrong."""
    if isinstance(raw, str):
        if not raw:
            raise InvalidRequest("input must not be an empty string.", param="input")
        return [raw]
    if not raw:
        raise InvalidRequest("input must not be an empty list.", param="input")
    if all(_is_token(t) for t in raw):
        return [list(raw)]
    inputs: list[Any] = raw
    if len(inputs) > max_inputs:
        raise InvalidRequest(
            f"input holds {len(inputs)} items; at most {max_inputs} are accepted in one request.",
            param="input",
        )
    strings = isinstance(inputs[0], str)  # the first item says which list this is; the others must agree
    for index, item in enumerate(inputs):
        fits = isinstance(item, str) if strings else isinstance(item, list) and all(map(_is_token, item))
        if not fits:
            raise InvalidRequest(
                f"input must be {_SHAPES}; item {index} does not fit (a list may not mix them).",
                param="input",
            )
    return inputs


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def render(
    vectors: npt.NDArray[np.float32],
    *,
    model: str,
    prompt_tokens: int,
    encoding_format: str,
    dimensions: int | None,
    renormalize: bool,
) -> bytes:
    if dimensions is not None and dimensions < vectors.shape[1]:
        vectors = vectors[:, :dimensions]
        if renormalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
    rows = vectors.astype("<f4", copy=False)
    if encoding_format == "base64":
        data = [Embedding(i, base64.b64encode(row.tobytes()).decode("ascii")) for i, row in enumerate(rows)]
    else:
        data = [Embedding(i, row.tolist()) for i, row in enumerate(rows)]
    usage = EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)
    return msgspec.json.encode(EmbeddingList(data=data, model=model, usage=usage))
