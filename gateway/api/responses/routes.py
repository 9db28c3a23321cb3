"""POST /v1/responses; the stored-response routes (GET/DELETE /v1/responses/{id}, cancel, input_items)
answer 400: the gateway stores no responses."""

from __future__ import annotations

from typing import Any, NoReturn

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.response import Stream

from gateway.api.codec import decode_body
from gateway.api.responses.protocol import ResponseRequest
from gateway.api.responses.service import ResponsesService
from gateway.core.principal import Principal
from gateway.core.request_state import RequestState

__all__ = ["ResponsesController"]

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_LOOKUP = {"scope": "chat", "action": "response.lookup"}


class ResponsesController(Controller):
    path = "/v1/responses"

    @post("/", status_code=200, opt={"scope": "chat", "action": "response.create"})
    async def create(
        self,
        request: Request[Any, Any, Any],
        responses: NamedDependency[ResponsesService],
        principal: NamedDependency[Principal],
        request_state: NamedDependency[RequestState],
    ) -> Response[Any]:
        body = decode_body(await request.body(), ResponseRequest)
        result = await responses.create(body, principal, request_state)
        if isinstance(result, msgspec.Struct):
            return Response(msgspec.json.encode(result), media_type="application/json")
        return Stream(result, media_type="text/event-stream", headers=_SSE_HEADERS)

    @get("/{response_id:str}", opt=_LOOKUP)
    async def retrieve(
        self, responses: NamedDependency[ResponsesService], response_id: FromPath[str]
    ) -> NoReturn:
        responses.refuse_lookup(response_id)

    @delete("/{response_id:str}", status_code=200, opt=_LOOKUP)
    async def delete_response(
        self, responses: NamedDependency[ResponsesService], response_id: FromPath[str]
    ) -> NoReturn:
        responses.refuse_lookup(response_id)

    @post("/{response_id:str}/cancel", status_code=200, opt=_LOOKUP)
    async def cancel(
        self, responses: NamedDependency[ResponsesService], response_id: FromPath[str]
    ) -> NoReturn:
        responses.refuse_lookup(response_id)

    @get("/{response_id:str}/input_items", opt=_LOOKUP)
    async def input_items(
        self, responses: NamedDependency[ResponsesService], response_id: FromPath[str]
    ) -> NoReturn:
        responses.refuse_lookup(response_id)
