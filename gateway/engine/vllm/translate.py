"""Our engine types <-> vLLM's OpenAI server: request bodies out, stream chunks and errors back.

Every request goes upstream as a stream (chat or legacy completions), with `continuous_usage_stats`, so the
token counts of each delta come from vLLM's own usage and the service's streaming and non-streaming paths
both read the same deltas.  vLLM's error `code` is the HTTP status as an int; ours is a string.
"""

from __future__ import annotations

from typing import Any

from gateway.core.errors import (
    ContextLengthExceeded,
    EngineFailure,
    EngineUnavailable,
    GatewayError,
    InvalidRequest,
    NotFound,
    RateLimited,
)
from gateway.engine.base import ChoiceDelta, FinishReason, GenerationRequest, TokenLogprob

__all__ = ["UsageCounter", "deltas_of", "error_from", "path_of", "request_body"]


def path_of(request: GenerationRequest) -> str:
    return "/v1/chat/completions" if request.messages is not None else "/v1/completions"


def request_body(
    request: GenerationRequest, served_name: str, default_max_tokens: int = 512
) -> dict[str, Any]:
    """The vLLM body for `request`; `served_name` is the base model's or the adapter's name there.  With no
    max_tokens it asks for `default_max_tokens`, which vLLM shortens to the context left: min(default, room),
    as on the local engine.  (vLLM's --override-generation-config max_new_tokens would cap every request.)"""
    s = request.sampling
    body: dict[str, Any] = {
        "model": served_name,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "n": request.n,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
    }
    if request.messages is not None:
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        if s.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = s.top_logprobs
    else:
        body["prompt"] = request.prompt or ""
        if s.logprobs:
            body["logprobs"] = s.top_logprobs
    body["max_tokens"] = s.max_tokens if s.max_tokens is not None else default_max_tokens
    if s.seed is not None:
        body["seed"] = s.seed
    if s.stop:
        body["stop"] = list(s.stop)
    if s.ignore_eos:
        body["ignore_eos"] = True
    return body


class UsageCounter:
    """vLLM's continuous usage is cumulative per choice (each chunk carries one choice and that choice's
    completion tokens so far); the closing usage chunk, with no choices, carries the request's total.  A
    delta's token count is the step since that choice's last chunk; prompt_tokens comes from any of them."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self._per_choice: dict[int, int] = {}

    @property
    def completion_tokens(self) -> int:
        return sum(self._per_choice.values())

    def step(self, usage: Any, index: int | None) -> int:
        """Tokens new in this chunk: for choice `index`, or (None) for the closing total."""
        if not isinstance(usage, dict):
            return 0
        self.prompt_tokens = int(usage.get("prompt_tokens") or self.prompt_tokens)
        reported = int(usage.get("completion_tokens") or 0)
        if index is None:
            step = max(0, reported - self.completion_tokens)
            if step:
                self._per_choice[-1] = self._per_choice.get(-1, 0) + step
            return step
        before = self._per_choice.get(index, 0)
        self._per_choice[index] = max(before, reported)
        return self._per_choice[index] - before


def _finish(reason: Any) -> FinishReason | None:
    if reason is None:
        return None
    if reason == "abort":
        raise EngineUnavailable("the vLLM server aborted the request; retry shortly")
    return "length" if reason == "length" else "stop"


def _chat_logprobs(raw: Any) -> list[TokenLogprob] | None:
    if not isinstance(raw, dict) or raw.get("content") is None:
        return None
    return [
        TokenLogprob(
            token=item["token"],
            logprob=float(item["logprob"]),
            bytes=list(item.get("bytes") or item["token"].encode()),
            top=[
                (t["token"], list(t.get("bytes") or t["token"].encode()), float(t["logprob"]))
                for t in item.get("top_logprobs") or []
            ],
        )
        for item in raw["content"]
    ]


def _completion_logprobs(raw: Any) -> list[TokenLogprob] | None:
    if not isinstance(raw, dict) or not raw.get("tokens"):
        return None
    tops = raw.get("top_logprobs") or [None] * len(raw["tokens"])
    return [
        TokenLogprob(
            token=token,
            logprob=float(value if value is not None else 0.0),
            bytes=list(token.encode()),
            top=[(t, list(t.encode()), float(lp)) for t, lp in (top or {}).items()],
        )
        for token, value, top in zip(raw["tokens"], raw["token_logprobs"], tops, strict=False)
    ]


def deltas_of(chunk: dict[str, Any], usage: UsageCounter) -> list[ChoiceDelta]:
    """One vLLM stream chunk -> our deltas, each with the tokens its chunk added (see UsageCounter)."""
    if "error" in chunk:
        raise error_from(_status_of(chunk["error"]), chunk)
    choices = chunk.get("choices") or []
    out: list[ChoiceDelta] = []
    for choice in choices:
        if "delta" in choice:
            text = choice["delta"].get("content") or ""
            logprobs = _chat_logprobs(choice.get("logprobs"))
        else:
            text = choice.get("text") or ""
            logprobs = _completion_logprobs(choice.get("logprobs"))
        index = int(choice.get("index", 0))
        step = usage.step(chunk.get("usage"), index) if len(choices) == 1 else 0
        out.append(
            ChoiceDelta(
                index=index,
                text=text,
                token_count=step,
                logprobs=logprobs,
                finish_reason=_finish(choice.get("finish_reason")),
            )
        )
    if not choices:
        step = usage.step(chunk.get("usage"), None)
        if step:  # the total says more than the choices did: book the rest on choice 0
            out.append(ChoiceDelta(index=0, text="", token_count=step))
    return out


def _status_of(error: Any) -> int:
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, int) and 400 <= code < 600 else 500


def _message_of(body: Any) -> str:
    error = body.get("error", body) if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return str(message)[:1000] if message else "the vLLM server refused the request"


def error_from(status: int, body: Any, prompt_param: str = "messages") -> GatewayError:
    """A vLLM error response (status, parsed JSON body or None) -> our typed error.  A context-length error
    names our request's field (`prompt_param`); others keep vLLM's param (a string) or None."""
    message = _message_of(body)
    error = body.get("error", body) if isinstance(body, dict) else {}
    param = error.get("param") if isinstance(error, dict) and isinstance(error.get("param"), str) else None
    lowered = message.lower()
    if status == 400 and any(s in lowered for s in ("context length", "max_model_len", "too long")):
        return ContextLengthExceeded(message, param=prompt_param)
    if status in (400, 422):
        return InvalidRequest(message, param=param)
    if status == 404:
        return NotFound(message, param="model", code="model_not_found")
    if status == 429:
        return RateLimited("the vLLM server is overloaded; retry shortly", code="engine_overloaded")
    if status in (502, 503, 504):
        return EngineUnavailable("the vLLM server is unavailable; retry shortly")
    return EngineFailure("the vLLM server failed to answer this request")
