"""POST /v1/chat/completions and POST /v1/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency
from litestar.response import Stream

from gateway.api.chat.protocol import ChatCompletionRequest, CompletionRequest
from gateway.api.chat.service import ChatService
from gateway.api.codec import decode_body
from gateway.core.principal import Principal
from gateway.core.request_state import RequestState

__all__ = ["ChatController"]

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _respond(result: msgspec.Struct | AsyncIterator[bytes]) -> Response[Any]:
    if isinstance(result, msgspec.Struct):
        return Response(msgspec.json.encode(result), media_type="application/json")
    return Stream(result, media_type="text/event-stream", headers=_SSE_HEADERS)


class ChatController(Controller):
    path = "/v1"

    @post("/chat/completions", status_code=200, opt={"scope": "chat", "action": "chat.completion.create"})
    async def chat_completions(
        self,
        request: Request[Any, Any, Any],
        chat: NamedDependency[ChatService],
        principal: NamedDependency[Principal],
        request_state: NamedDependency[RequestState],
    ) -> Response[Any]:
        body = decode_body(await request.body(), ChatCompletionRequest)
        return _respond(await chat.chat(body, principal, request_state))

    @post("/completions", status_code=200, opt={"scope": "chat", "action": "completion.create"})
    async def completions(
        self,
        request: Request[Any, Any, Any],
        chat: NamedDependency[ChatService],
        principal: NamedDependency[Principal],
        request_state: NamedDependency[RequestState],
    ) -> Response[Any]:
        body = decode_body(await request.body(), CompletionRequest)
        return _respond(await chat.complete(body, principal, request_state))
