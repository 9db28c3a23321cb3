"""Chat and legacy completions: protocol requests -> engine requests -> OpenAI responses or SSE chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgspec
import structlog

from gateway.auth.principal import Principal
from gateway.engine.base import ChatMessage, GenerationRequest, GenerationStream, SamplingParams
from gateway.engine.base import TokenLogprob as EngineLogprob
from gateway.errors import GatewayError, InvalidRequest
from gateway.metrics import GatewayMetrics
from gateway.protocol import chat as p
from gateway.protocol import completions as pc
from gateway.serving.registry import ModelEntry, ModelRegistry
from gateway.settings import LimitSettings

__all__ = ["ChatService", "UsageSink"]

log = structlog.get_logger(__name__)

UsageSink = Callable[[int, int], None]  # (prompt_tokens, completion_tokens), for audit and metrics

_ROLE_MAP = {"developer": "system", "function": "tool"}


@dataclass
class _Accumulated:
    text: str = ""
    tokens: int = 0
    finish: str | None = None
    logprobs: list[EngineLogprob] | None = None


class ChatService:
    def __init__(
        self, registry: ModelRegistry, limits: LimitSettings, metrics: GatewayMetrics | None = None
    ) -> None:
        self._registry = registry
        self._limits = limits
        self._metrics = metrics

    # -- chat --------------------------------------------------------------------------------------------

    async def chat(
        self, req: p.ChatCompletionRequest, principal: Principal, request_id: str, on_usage: UsageSink
    ) -> p.ChatCompletion | AsyncIterator[bytes]:
        started = time.perf_counter()
        engine, entry = await self._registry.engine_for(req.model, principal)
        on_usage, on_first_token = self._observed(entry, on_usage, started)
        max_tokens = req.max_completion_tokens or req.max_tokens
        sampling = self._sampling(
            req, max_tokens, logprobs=bool(req.logprobs), top_logprobs=req.top_logprobs or 0
        )
        if req.top_logprobs and not req.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
        messages = tuple(_message(i, m) for i, m in enumerate(req.messages))
        stream = await engine.submit(
            GenerationRequest(
                request_id=request_id,
                model=entry.base,
                messages=messages,
                sampling=sampling,
                n=req.n or 1,
                adapter=None if entry.is_base else entry.id,
            )
        )
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._chat_chunks(
                stream, completion_id, created, req.model, req.n or 1, include_usage, on_usage, on_first_token
            )
        results = await _collect(stream, req.n or 1)
        completion_tokens = sum(r.tokens for r in results)
        on_usage(stream.prompt_tokens, completion_tokens)
        return p.ChatCompletion(
            id=completion_id,
            created=created,
            model=req.model,
            choices=[
                p.Choice(
                    index=i,
                    message=p.ResponseMessage(role="assistant", content=r.text),
                    logprobs=p.ChoiceLogprobs(content=_chat_logprobs(r.logprobs))
                    if sampling.logprobs
                    else None,
                    finish_reason=r.finish or "stop",  # type: ignore[arg-type]
                )
                for i, r in enumerate(results)
            ],
            usage=_usage(stream.prompt_tokens, completion_tokens),
        )

    async def _chat_chunks(
        self,
        stream: GenerationStream,
        completion_id: str,
        created: int,
        model: str,
        n: int,
        include_usage: bool,
        on_usage: UsageSink,
        on_first_token: Callable[[], None],
    ) -> AsyncIterator[bytes]:
        def chunk(
            choices: list[p.ChunkChoice], usage: p.Usage | msgspec.UnsetType | None = msgspec.UNSET
        ) -> bytes:
            if include_usage and usage is msgspec.UNSET:
                usage = None  # OpenAI sends "usage": null on every chunk but the last when usage is asked for
            body = p.ChatCompletionChunk(
                id=completion_id, created=created, model=model, choices=choices, usage=usage
            )
            return b"data: " + msgspec.json.encode(body) + b"\n\n"

        completion_tokens = 0
        try:
            for index in range(n):
                yield chunk([p.ChunkChoice(index=index, delta=p.Delta(role="assistant", content=""))])
            async for delta in stream:
                completion_tokens += delta.token_count
                if delta.text or delta.logprobs:
                    on_first_token()
                    logprobs = (
                        p.ChoiceLogprobs(content=_chat_logprobs(delta.logprobs)) if delta.logprobs else None
                    )
                    yield chunk(
                        [
                            p.ChunkChoice(
                                index=delta.index, delta=p.Delta(content=delta.text), logprobs=logprobs
                            )
                        ]
                    )
                if delta.finish_reason is not None:
                    yield chunk(
                        [p.ChunkChoice(index=delta.index, delta=p.Delta(), finish_reason=delta.finish_reason)]
                    )
            if include_usage:
                yield chunk([], _usage(stream.prompt_tokens, completion_tokens))
            yield b"data: [DONE]\n\n"
        except GatewayError as exc:  # headers are sent: report in-band, as OpenAI does
            yield b"data: " + msgspec.json.encode(exc.envelope()) + b"\n\n"
        finally:
            on_usage(stream.prompt_tokens, completion_tokens)
            await stream.aclose()

    # -- legacy completions ------------------------------------------------------------------------------

    async def complete(
        self, req: pc.CompletionRequest, principal: Principal, request_id: str, on_usage: UsageSink
    ) -> pc.Completion | AsyncIterator[bytes]:
        started = time.perf_counter()
        engine, entry = await self._registry.engine_for(req.model, principal)
        on_usage, on_first_token = self._observed(entry, on_usage, started)
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        sampling = self._sampling(
            req, req.max_tokens, logprobs=req.logprobs is not None, top_logprobs=req.logprobs or 0
        )
        stream = await engine.submit(
            GenerationRequest(
                request_id=request_id,
                model=entry.base,
                prompt=prompt,
                sampling=sampling,
                n=req.n or 1,
                adapter=None if entry.is_base else entry.id,
            )
        )
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        echo = prompt if req.echo else ""
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._completion_chunks(
                stream, completion_id, created, req.model, echo, include_usage, on_usage, on_first_token
            )
        results = await _collect(stream, req.n or 1)
        completion_tokens = sum(r.tokens for r in results)
        on_usage(stream.prompt_tokens, completion_tokens)
        return pc.Completion(
            id=completion_id,
            created=created,
            model=req.model,
            choices=[
                pc.CompletionChoice(
                    index=i,
                    text=echo + r.text,
                    finish_reason=r.finish or "stop",  # type: ignore[arg-type]
                    logprobs=_completion_logprobs(r.logprobs, len(echo)) if sampling.logprobs else None,
                )
                for i, r in enumerate(results)
            ],
            usage=_usage(stream.prompt_tokens, completion_tokens),
        )

    async def _completion_chunks(
        self,
        stream: GenerationStream,
        completion_id: str,
        created: int,
        model: str,
        echo: str,
        include_usage: bool,
        on_usage: UsageSink,
        on_first_token: Callable[[], None],
    ) -> AsyncIterator[bytes]:
        def chunk(
            choices: list[pc.CompletionChoice], usage: p.Usage | msgspec.UnsetType | None = msgspec.UNSET
        ) -> bytes:
            if include_usage and usage is msgspec.UNSET:
                usage = None
            body = pc.Completion(id=completion_id, created=created, model=model, choices=choices, usage=usage)
            return b"data: " + msgspec.json.encode(body) + b"\n\n"

        completion_tokens = 0
        echoed: set[int] = set()
        try:
            async for delta in stream:
                completion_tokens += delta.token_count
                if delta.text:
                    on_first_token()
                prefix = echo if delta.index not in echoed else ""
                echoed.add(delta.index)
                yield chunk(
                    [
                        pc.CompletionChoice(
                            index=delta.index,
                            text=prefix + delta.text,
                            finish_reason=delta.finish_reason,
                            logprobs=None,
                        )
                    ]
                )
            if include_usage:
                yield chunk([], _usage(stream.prompt_tokens, completion_tokens))
            yield b"data: [DONE]\n\n"
        except GatewayError as exc:
            yield b"data: " + msgspec.json.encode(exc.envelope()) + b"\n\n"
        finally:
            on_usage(stream.prompt_tokens, completion_tokens)
            await stream.aclose()

    # -- shared ------------------------------------------------------------------------------------------

    def _observed(
        self, entry: ModelEntry, on_usage: UsageSink, started: float
    ) -> tuple[UsageSink, Callable[[], None]]:
        """Metrics hooks: the usage sink also counts tokens; a once-only time-to-first-token timer."""
        metrics = self._metrics
        if metrics is None:
            return on_usage, lambda: None
        model, kind = entry.base, "base" if entry.is_base else "fine_tuned"  # never the tenant's model id
        first: list[float] = []

        def usage(prompt_tokens: int, completion_tokens: int) -> None:
            on_usage(prompt_tokens, completion_tokens)
            metrics.observe_usage(model, kind, prompt_tokens, completion_tokens)

        def first_token() -> None:
            if not first:
                first.append(time.perf_counter() - started)
                metrics.observe_first_token(model, kind, first[0])

        return usage, first_token

    def _sampling(
        self,
        req: p.SamplingRequest,
        max_tokens: int | None,
        *,
        logprobs: bool,
        top_logprobs: int,
    ) -> SamplingParams:
        if max_tokens is not None and max_tokens > self._limits.max_tokens_cap:
            raise InvalidRequest(
                f"max_tokens must be at most {self._limits.max_tokens_cap} on this server", param="max_tokens"
            )
        if (req.n or 1) > self._limits.max_n:
            raise InvalidRequest(f"n must be at most {self._limits.max_n} on this server", param="n")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            stop=stop,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            ignore_eos=req.ignore_eos,
        )


def _message(index: int, message: p.ChatMessageIn) -> ChatMessage:
    content = message.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        parts = []
        for j, part in enumerate(content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(
                    "Only text content parts are supported by this server",
                    param=f"messages[{index}].content[{j}]",
                )
            parts.append(part["text"])
        text = "".join(parts)
    return ChatMessage(role=_ROLE_MAP.get(message.role, message.role), content=text)


async def _collect(stream: GenerationStream, n: int) -> list[_Accumulated]:
    results = [_Accumulated() for _ in range(n)]
    async for delta in stream:
        acc = results[delta.index]
        acc.text += delta.text
        acc.tokens += delta.token_count
        if delta.logprobs:
            acc.logprobs = (acc.logprobs or []) + delta.logprobs
        if delta.finish_reason is not None:
            acc.finish = delta.finish_reason
    return results


def _usage(prompt: int, completion: int) -> p.Usage:
    return p.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _chat_logprobs(items: list[EngineLogprob] | None) -> list[p.TokenLogprob]:
    return [
        p.TokenLogprob(
            token=i.token,
            logprob=i.logprob,
            bytes=i.bytes,
            top_logprobs=[p.TopLogprob(token=t, logprob=lp, bytes=b) for t, b, lp in i.top],
        )
        for i in items or []
    ]


def _completion_logprobs(items: list[EngineLogprob] | None, offset: int) -> pc.CompletionLogprobs:
    tokens, values, tops, offsets = [], [], [], []
    for item in items or []:
        offsets.append(offset)
        offset += len(item.token)
        tokens.append(item.token)
        values.append(item.logprob)
        tops.append({t: lp for t, _, lp in item.top})
    return pc.CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)
