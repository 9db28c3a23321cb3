"""POST /v1/embeddings: the request and response as the OpenAI spec names them (CreateEmbeddingRequest,
CreateEmbeddingResponse).  `input` is decoded loosely (msgspec allows one array type in a union) and its
shape is checked by the service, which names what is wrong."""

from __future__ import annotations

from typing import Any, Literal

from msgspec import UNSET, Struct, UnsetType

__all__ = ["Embedding", "EmbeddingList", "EmbeddingRequest", "EmbeddingUsage"]


class EmbeddingRequest(Struct):
    model: str
    input: str | list[Any]  # a string, strings, token ids, or lists of token ids
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | UnsetType = UNSET
    user: str | UnsetType = UNSET  # accepted, never stored or logged


class Embedding(Struct):
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32
    object: Literal["embedding"] = "embedding"


class EmbeddingUsage(Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Struct):
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    object: Literal["list"] = "list"
