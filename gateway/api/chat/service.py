"""Chat and legacy completions: protocol requests -> engine requests -> OpenAI responses or SSE chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog

from gateway.api.chat import protocol as p
from gateway.api.chat.streams import MergedStream
from gateway.api.chat.structured import Plan, plan_for
from gateway.api.chat.tool_output import StreamedChoice, final_message
from gateway.api.models.registry import ModelEntry, ModelRegistry
from gateway.auth.quotas import TokenBudget
from gateway.core.errors import GatewayError, InvalidRequest
from gateway.core.principal import Principal
from gateway.core.request_state import RequestState
from gateway.core.settings import LimitSettings
from gateway.engine.base import ChatMessage, ChoiceDelta, GenerationRequest, GenerationStream, SamplingParams
from gateway.engine.base import TokenLogprob as EngineLogprob
from gateway.observability.metrics import GatewayMetrics

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


@dataclass
class _Generation:
    """One request accepted by an engine, with the hooks that observe it (audit usage, metrics)."""

    stream: GenerationStream
    sampling: SamplingParams
    n: int
    on_usage: UsageSink
    on_first_token: Callable[[], None]
    created: int = field(default_factory=lambda: int(time.time()))

    async def collect(self) -> tuple[list[_Accumulated], p.Usage]:
        results = [_Accumulated() for _ in range(self.n)]
        async for delta in self.stream:
            acc = results[delta.index]
            acc.text += delta.text
            acc.tokens += delta.token_count
            if delta.logprobs:
                acc.logprobs = (acc.logprobs or []) + delta.logprobs
            if delta.finish_reason is not None:
                acc.finish = delta.finish_reason
        completion_tokens = sum(r.tokens for r in results)
        self.on_usage(self.stream.prompt_tokens, completion_tokens)
        return results, _usage(self.stream.prompt_tokens, completion_tokens)

    async def sse(
        self,
        chunk: Callable[[list[Any], p.Usage | msgspec.UnsetType | None], bytes],
        choices_for: Callable[[ChoiceDelta], list[list[Any]]],
        *,
        include_usage: bool,
        opening: list[list[Any]] = [],  # noqa: B006 - never mutated
    ) -> AsyncIterator[bytes]:
        """The SSE body: `data: {chunk}` events, the usage chunk if asked for, then `data: [DONE]`."""
        completion_tokens = 0
        # OpenAI sends "usage": null on every chunk but the last when usage is asked for
        no_usage = None if include_usage else msgspec.UNSET
        try:
            for choices in opening:
                yield chunk(choices, no_usage)
            async for delta in self.stream:
                completion_tokens += delta.token_count
                if delta.text or delta.logprobs:
                    self.on_first_token()
                for choices in choices_for(delta):
                    yield chunk(choices, no_usage)
            if include_usage:
                yield chunk([], _usage(self.stream.prompt_tokens, completion_tokens))
            yield b"data: [DONE]\n\n"
        except GatewayError as exc:  # headers are sent: report in-band, as OpenAI does
            yield b"data: " + msgspec.json.encode(exc.envelope()) + b"\n\n"
        finally:
            self.on_usage(self.stream.prompt_tokens, completion_tokens)
            await self.stream.aclose()


def _event(body: msgspec.Struct) -> bytes:
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


class ChatService:
    def __init__(
        self,
        registry: ModelRegistry,
        limits: LimitSettings,
        metrics: GatewayMetrics | None = None,
        *,
        tokens: TokenBudget | None = None,
    ) -> None:
        self._registry = registry
        self._limits = limits
        self._metrics = metrics
        self._tokens = tokens  # the tenants' tokens-per-minute quota

    # -- chat --------------------------------------------------------------------------------------------

    async def chat(
        self, req: p.ChatCompletionRequest, principal: Principal, state: RequestState
    ) -> p.ChatCompletion | AsyncIterator[bytes]:
        if req.top_logprobs and not req.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
        plan = plan_for(req)
        gen = await self._generate(
            req,
            principal,
            state.request_id,
            state.record_usage,
            max_tokens=req.max_completion_tokens or req.max_tokens,
            logprobs=bool(req.logprobs),
            top_logprobs=req.top_logprobs or 0,
            messages=tuple(_message(i, m) for i, m in enumerate(req.messages)),
            plan=plan,
        )
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if plan.tool_mode != "none":
            return await self._chat_with_tools(req, plan, gen, completion_id)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(choices: list[Any], usage: p.Usage | msgspec.UnsetType | None) -> bytes:
                return _event(
                    p.ChatCompletionChunk(
                        id=completion_id, created=gen.created, model=req.model, choices=choices, usage=usage
                    )
                )

            def choices_for(delta: ChoiceDelta) -> list[list[Any]]:
                out = []
                if delta.text or delta.logprobs:
                    logprobs = (
                        p.ChoiceLogprobs(content=_chat_logprobs(delta.logprobs)) if delta.logprobs else None
                    )
                    content = p.Delta(content=delta.text)
                    out.append([p.ChunkChoice(index=delta.index, delta=content, logprobs=logprobs)])
                if delta.finish_reason is not None:
                    finish = p.ChunkChoice(
                        index=delta.index, delta=p.Delta(), finish_reason=delta.finish_reason
                    )
                    out.append([finish])
                return out

            opening = [
                [p.ChunkChoice(index=i, delta=p.Delta(role="assistant", content=""))] for i in range(gen.n)
            ]
            return gen.sse(chunk, choices_for, include_usage=include_usage, opening=opening)
        results, usage = await gen.collect()
        return p.ChatCompletion(
            id=completion_id,
            created=gen.created,
            model=req.model,
            choices=[
                p.Choice(
                    index=i,
                    message=p.ResponseMessage(role="assistant", content=r.text),
                    logprobs=p.ChoiceLogprobs(content=_chat_logprobs(r.logprobs))
                    if gen.sampling.logprobs
                    else None,
                    finish_reason=r.finish or "stop",  # type: ignore[arg-type]
                )
                for i, r in enumerate(results)
            ],
            usage=usage,
        )

    async def _chat_with_tools(
        self, req: p.ChatCompletionRequest, plan: Plan, gen: _Generation, completion_id: str
    ) -> p.ChatCompletion | AsyncIterator[bytes]:
        """A request with tools: the text is parsed for calls (tool_output.py)."""
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            choices = [StreamedChoice(i, plan) for i in range(gen.n)]

            def chunk(items: list[Any], usage: p.Usage | msgspec.UnsetType | None) -> bytes:
                return _event(
                    p.ChatCompletionChunk(
                        id=completion_id, created=gen.created, model=req.model, choices=items, usage=usage
                    )
                )

            def choices_for(delta: ChoiceDelta) -> list[list[Any]]:
                logprobs = (
                    p.ChoiceLogprobs(content=_chat_logprobs(delta.logprobs)) if delta.logprobs else None
                )
                return [[c] for c in choices[delta.index].feed(delta.text, logprobs, delta.finish_reason)]

            opening = [
                [p.ChunkChoice(index=i, delta=p.Delta(role="assistant", content=""))] for i in range(gen.n)
            ]
            return gen.sse(chunk, choices_for, include_usage=include_usage, opening=opening)
        results, usage = await gen.collect()
        out = []
        for i, r in enumerate(results):
            message, finish = final_message(r.text, plan, r.finish)
            logprobs = p.ChoiceLogprobs(content=_chat_logprobs(r.logprobs)) if gen.sampling.logprobs else None
            out.append(p.Choice(index=i, message=message, logprobs=logprobs, finish_reason=finish))
        return p.ChatCompletion(
            id=completion_id, created=gen.created, model=req.model, choices=out, usage=usage
        )

    # -- legacy completions ------------------------------------------------------------------------------

    async def complete(
        self, req: p.CompletionRequest, principal: Principal, state: RequestState
    ) -> p.Completion | AsyncIterator[bytes]:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) > self._limits.max_prompts:
            raise InvalidRequest(
                f"at most {self._limits.max_prompts} prompts per request on this server", param="prompt"
            )
        gen = await self._generate(
            req,
            principal,
            state.request_id,
            state.record_usage,
            max_tokens=req.max_tokens,
            logprobs=req.logprobs is not None,
            top_logprobs=req.logprobs or 0,
            prompts=prompts,
        )
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        n = req.n or 1

        def echo_of(index: int) -> str:  # choice i * n + j belongs to prompt i
            return prompts[index // n] if req.echo else ""

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            offsets: dict[int, int] = {}  # per choice: characters sent so far, for logprobs.text_offset

            def chunk(choices: list[Any], usage: p.Usage | msgspec.UnsetType | None) -> bytes:
                return _event(
                    p.Completion(
                        id=completion_id, created=gen.created, model=req.model, choices=choices, usage=usage
                    )
                )

            def choices_for(delta: ChoiceDelta) -> list[list[Any]]:
                first = delta.index not in offsets
                echo = echo_of(delta.index) if first else ""
                text = echo + delta.text
                start = offsets.get(delta.index, 0) + len(echo)
                offsets[delta.index] = offsets.get(delta.index, 0) + len(text)
                logprobs = _completion_logprobs(delta.logprobs, start) if gen.sampling.logprobs else None
                choice = p.CompletionChoice(
                    index=delta.index, text=text, finish_reason=delta.finish_reason, logprobs=logprobs
                )
                return [[choice]]

            return gen.sse(chunk, choices_for, include_usage=include_usage)
        results, usage = await gen.collect()
        return p.Completion(
            id=completion_id,
            created=gen.created,
            model=req.model,
            choices=[
                p.CompletionChoice(
                    index=i,
                    text=echo_of(i) + r.text,
                    finish_reason=r.finish or "stop",  # type: ignore[arg-type]
                    logprobs=_completion_logprobs(r.logprobs, len(echo_of(i)))
                    if gen.sampling.logprobs
                    else None,
                )
                for i, r in enumerate(results)
            ],
            usage=usage,
        )

    # -- shared ------------------------------------------------------------------------------------------

    async def _generate(
        self,
        req: p.SamplingRequest,
        principal: Principal,
        request_id: str,
        on_usage: UsageSink,
        *,
        max_tokens: int | None,
        logprobs: bool,
        top_logprobs: int,
        messages: tuple[ChatMessage, ...] | None = None,
        prompts: list[str] | None = None,
        plan: Plan | None = None,
    ) -> _Generation:
        """Resolve the model for this principal, check the sampling request and submit it to the engine:
        the chat `messages`, or each of the legacy `prompts` as its own engine request."""
        started = time.perf_counter()
        if self._tokens is not None:
            self._tokens.check(principal.tenant)  # 429 while the tenant's minute of tokens is used up
            on_usage = _charging(on_usage, self._tokens, principal.tenant)
        engine, entry = await self._registry.engine_for(req.model, principal)
        observed_usage, on_first_token = self._observed(entry, on_usage, started)
        sampling = self._sampling(req, max_tokens, logprobs=logprobs, top_logprobs=top_logprobs)
        n = req.n or 1
        streams: list[GenerationStream] = []
        try:
            for prompt in prompts if prompts is not None else [None]:
                request = GenerationRequest(
                    request_id=request_id,
                    model=entry.base,
                    messages=messages,
                    prompt=prompt,
                    sampling=sampling,
                    n=n,
                    adapter=None if entry.is_base else entry.id,
                    grammar=plan.grammar if plan else None,
                    tools=plan.tools if plan else (),
                )
                streams.append(await engine.submit(request))
        except InvalidRequest as exc:
            for stream in streams:
                await stream.aclose()
            if plan is not None and exc.param == "response_format" and plan.grammar_param != exc.param:
                raise InvalidRequest(
                    exc.message.replace("JSON schema", "parameters schema"), param=plan.grammar_param
                ) from None
            raise
        except BaseException:  # one prompt refused (too long, queue full): abort those already queued
            for stream in streams:
                await stream.aclose()
            raise
        stream = streams[0] if len(streams) == 1 else MergedStream(streams, n)
        return _Generation(stream, sampling, n * len(streams), observed_usage, on_first_token)

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


def _charging(on_usage: UsageSink, tokens: TokenBudget, tenant: str) -> UsageSink:
    def usage(prompt_tokens: int, completion_tokens: int) -> None:
        on_usage(prompt_tokens, completion_tokens)
        tokens.charge(tenant, prompt_tokens + completion_tokens)

    return usage


def _tool_calls_in(index: int, message: p.ChatMessageIn) -> tuple[dict[str, Any], ...]:
    """An assistant's earlier calls (tool_calls, or the deprecated function_call), checked for shape."""
    calls = list(message.tool_calls) if message.tool_calls is not msgspec.UNSET else []
    if isinstance(message.function_call, dict):
        calls.append({"id": "call_legacy", "type": "function", "function": message.function_call})
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments", ""), str)
        ):
            raise InvalidRequest(
                "a tool call needs function.name and function.arguments (a JSON string)",
                param=f"messages[{index}].tool_calls[{j}]",
            )
    return tuple(calls)


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
    if message.role == "tool" and message.tool_call_id is msgspec.UNSET:
        raise InvalidRequest("a tool message needs tool_call_id", param=f"messages[{index}].tool_call_id")
    return ChatMessage(
        role=_ROLE_MAP.get(message.role, message.role),
        content=text,
        tool_calls=_tool_calls_in(index, message) if message.role == "assistant" else (),
        tool_call_id=message.tool_call_id if isinstance(message.tool_call_id, str) else None,
        name=message.name if isinstance(message.name, str) else None,
    )


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


def _completion_logprobs(items: list[EngineLogprob] | None, offset: int) -> p.CompletionLogprobs:
    tokens, values, tops, offsets = [], [], [], []
    for item in items or []:
        offsets.append(offset)
        offset += len(item.token)
        tokens.append(item.token)
        values.append(item.logprob)
        tops.append({t: lp for t, _, lp in item.top})
    return p.CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)
