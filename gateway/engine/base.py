"""The engine boundary: what serving hands an engine and what comes back.

Messages (or a prompt) + sampling + an optional adapter name go in; a stream of per-choice deltas comes out.
Routes and serving code know only these types, so a remote backend (vLLM over HTTP) can sit behind the same
Protocol later without touching them.  No torch here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

__all__ = [
    "ChatMessage",
    "ChoiceDelta",
    "Engine",
    "EngineStats",
    "FinishReason",
    "GenerationRequest",
    "GenerationStream",
    "Grammar",
    "SamplingParams",
    "TokenLogprob",
]

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    tool_calls: tuple[dict[str, Any], ...] = ()  # an assistant's calls: {"id", "type", "function": {...}}
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None


@dataclass(frozen=True)
class Grammar:
    """Structured output, enforced token by token (constrained decoding): the engine masks every token that
    would leave the grammar, so the text always parses.  `schema` is a JSON Schema as JSON text; `kind`
    "json_object" is any JSON object.  The engine refuses (InvalidRequest) a schema it cannot enforce."""

    kind: Literal["json_schema", "json_object"]
    schema: str = ""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: the engine's default, bounded by the context left
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False  # vLLM's extension: decode to max_tokens (benchmarks)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    model: str  # a base model name; the engine serves one base model
    messages: tuple[ChatMessage, ...] | None = None  # chat: rendered with the model's chat template
    prompt: str | None = None  # legacy completions: used as is
    sampling: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    adapter: str | None = None
    grammar: Grammar | None = None
    tools: tuple[dict[str, Any], ...] = ()  # function definitions, rendered into the prompt (chat only)


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, list[int], float]]  # (token, bytes, logprob)


@dataclass(frozen=True)
class ChoiceDelta:
    index: int
    text: str
    token_count: int
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class EngineStats:
    running: int
    queued: int
    adapters: int
    max_running: int
    max_queued: int
    restarts: int = 0  # times the engine rebuilt itself after repeated failures
    failed_steps: int = 0  # engine steps that failed (their requests got a 500)
    # what start-up sized (or was configured) on this machine; 0 where the backend does not say
    prefill_token_budget: int = 0  # prompt tokens one engine step may prefill
    kv_cache_tokens: int = 0  # tokens the KV cache holds (slots x max_model_len)
    kv_cache_bytes: int = 0
    tenant_concurrency: int = (
        0  # the per-tenant in-flight limit this engine suggests (limits.tenant_concurrency auto)
    )


class GenerationStream(Protocol):
    """One accepted request.  Iterate for deltas; `aclose()` aborts it and frees its slots."""

    prompt_tokens: int

    def __aiter__(self) -> AsyncIterator[ChoiceDelta]: ...

    async def aclose(self) -> None: ...


class Engine(Protocol):
    model_name: str
    max_model_len: int

    async def submit(self, request: GenerationRequest) -> GenerationStream:
        """Validate, tokenize and queue a request.  Raises InvalidRequest / ContextLengthExceeded /
        RateLimited (queue full) / EngineUnavailable before anything is streamed."""
        ...

    def add_adapter(self, name: str, path: Path) -> None: ...

    def remove_adapter(self, name: str) -> None: ...

    def has_adapter(self, name: str) -> bool: ...

    def stats(self) -> EngineStats: ...

    def is_ready(self) -> bool: ...

    def is_failed(self) -> bool:
        """True once the engine gave up (it could not rebuild itself): the process should exit."""
        ...

    def start(self) -> None: ...

    def shutdown(self) -> None: ...
