"""POST /v1/embeddings."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency

from gateway.api.codec import decode_body
from gateway.api.embeddings.protocol import EmbeddingRequest
from gateway.api.embeddings.service import EmbeddingsService
from gateway.core.principal import Principal
from gateway.core.request_state import RequestState

__all__ = ["EmbeddingsController"]


class EmbeddingsController(Controller):
    path = "/v1"

    @post("/embeddings", status_code=200, opt={"scope": "embeddings", "action": "embedding.create"})
    async def create_embeddings(
        self,
        request: Request[Any, Any, Any],
        embeddings: NamedDependency[EmbeddingsService],
        principal: NamedDependency[Principal],
        request_state: NamedDependency[RequestState],
    ) -> Response[bytes]:
        body = decode_body(await request.body(), EmbeddingRequest)
        return Response(
            await embeddings.create(body, principal, request_state), media_type="application/json"
        )
