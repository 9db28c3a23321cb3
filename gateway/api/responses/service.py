"""POST /v1/responses, stateless: a Responses request answered by the chat service, re-told as a Response.

    ResponseRequest --translate.to_chat--> ChatCompletionRequest --ChatService.chat--> ChatCompletion
        --translate.output_items--> Response                      (or, streamed: chat SSE chunks
        --stream.response_events--> the Responses event sequence)

The chat service does everything a chat request gets: model resolution and scope, limits, the engine,
usage for the audit record and metrics.  Nothing is stored: requests that need a stored response are 400s
that say why (translate.refuse_stored_state), and so is every lookup of a response by id.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Collection
from typing import Any, NoReturn

import msgspec

from gateway.api.chat.protocol import ChatCompletionRequest
from gateway.api.chat.service import ChatService
from gateway.api.responses import protocol as p
from gateway.api.responses.stream import response_events
from gateway.api.responses.translate import (
    ChatCompletionView,
    ChatTranslation,
    error_path,
    new_id,
    output_items,
    refuse_stored_state,
    to_chat,
)
from gateway.core.errors import InvalidRequest
from gateway.core.principal import Principal
from gateway.core.request_state import RequestState

__all__ = ["CHAT_FIELDS", "ResponsesService"]

CHAT_FIELDS = frozenset(field.name for field in msgspec.structs.fields(ChatCompletionRequest))
_RENAMED = ("max_completion_tokens", "max_tokens")  # chat names in chat messages, as the client wrote them


class ResponsesService:
    def __init__(self, chat: ChatService, chat_fields: Collection[str] = CHAT_FIELDS) -> None:
        self._chat = chat
        self._chat_fields = chat_fields  # what the chat request can carry (tests narrow or widen it)

    async def create(
        self, req: p.ResponseRequest, principal: Principal, state: RequestState
    ) -> p.Response | AsyncIterator[bytes]:
        refuse_stored_state(req)
        translation = to_chat(req, self._chat_fields)
        if req.stream:
            translation.body["stream"] = True
            translation.body["stream_options"] = {"include_usage": True}
        response = _in_progress(req, translation)
        try:
            result = await self._chat.chat(_chat_request(translation), principal, state)
        except InvalidRequest as exc:  # name the field the client sent, not the chat request's
            chat_param, exc.param = exc.param, translation.param(exc.param)
            for name in _RENAMED:
                if chat_param == name:
                    exc.message = exc.message.replace(name, "max_output_tokens")
            raise
        if not isinstance(result, msgspec.Struct):
            return response_events(result, response)
        view = msgspec.convert(msgspec.to_builtins(result), ChatCompletionView)
        choice, usage = view.choices[0], view.usage
        incomplete = choice.finish_reason == "length"
        return msgspec.structs.replace(
            response,
            status="incomplete" if incomplete else "completed",
            output=output_items(choice.message, choice.finish_reason),
            usage=p.ResponseUsage(
                input_tokens=usage.prompt_tokens,
                output_tokens=usage.completion_tokens,
                total_tokens=usage.prompt_tokens + usage.completion_tokens,
            ),
            completed_at=None if incomplete else int(time.time()),
            incomplete_details=p.IncompleteDetails("max_output_tokens") if incomplete else None,
        )

    def refuse_lookup(self, response_id: str) -> NoReturn:
        """GET/DELETE /v1/responses/{id} and friends: there is never a stored response to find."""
        raise InvalidRequest(
            "This gateway stores no responses (privacy), so none can be retrieved, cancelled or deleted; "
            "keep the response you received and send the conversation as `input`.",
            param="response_id",
        )


def _chat_request(translation: ChatTranslation) -> ChatCompletionRequest:
    try:
        return msgspec.convert(translation.body, ChatCompletionRequest)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"Invalid request: {exc}", param=translation.param(error_path(exc))) from None


def _in_progress(req: p.ResponseRequest, translation: ChatTranslation) -> p.Response:
    """The Response object as it stands before the first token: the request's settings echoed."""
    tools: list[dict[str, Any]] = [
        {"type": "function", **tool["function"]} for tool in translation.body.get("tools", [])
    ]
    text_format = req.text.format if req.text is not None and req.text.format is not msgspec.UNSET else None
    return p.Response(
        id=new_id("resp"),
        created_at=int(time.time()),
        status="in_progress",
        model=req.model,
        output=[],
        instructions=req.instructions,
        max_output_tokens=req.max_output_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        tools=tools,
        tool_choice=req.tool_choice if req.tool_choice is not None else "auto",
        parallel_tool_calls=True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        text={"format": text_format or {"type": "text"}},
        metadata=req.metadata or {},
        user=msgspec.UNSET if req.user is None else req.user,
    )
