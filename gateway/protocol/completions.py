"""POST /v1/completions (legacy prompt completion): CreateCompletionRequest / CreateCompletionResponse."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

from gateway.protocol.chat import SamplingRequest, Usage

__all__ = ["Completion", "CompletionChoice", "CompletionLogprobs", "CompletionRequest"]


class CompletionRequest(SamplingRequest, kw_only=True):
    prompt: str | Annotated[list[str], Meta(min_length=1)]  # token-id prompts are not served
    max_tokens: Annotated[int, Meta(ge=1)] | None = 16
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    echo: bool | None = None


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class Completion(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: Literal["text_completion"] = "text_completion"
    system_fingerprint: str | UnsetType = UNSET
    usage: Usage | UnsetType | None = UNSET
