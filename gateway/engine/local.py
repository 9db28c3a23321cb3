"""The in-process engine: one scheduler thread owns the model and runs continuous batching.

The async app calls `submit()`, which tokenizes, validates and queues the request and returns a stream.  The
scheduler thread loops: take commands (new requests, aborts) -> admit waiting requests into free KV slots ->
run one step (a decode token for every running sequence plus prompt chunks of newly admitted ones) -> sample
-> detokenize -> push deltas to each request's asyncio queue.  A request joins the running batch at the next
step, and one that finishes or is aborted frees its slot at once; slots are kept dense by moving the last one
into the hole.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch

from gateway.engine.base import (
    ChoiceDelta,
    EngineStats,
    FinishReason,
    GenerationRequest,
    TokenLogprob,
)
from gateway.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from gateway.engine.lora import LoraAdapter
from gateway.engine.quantized import Scheme
from gateway.engine.runner import ModelRunner, PrefillSegment, StepBatch
from gateway.engine.sampling import SequenceSampler, sample_batch
from gateway.errors import (
    ContextLengthExceeded,
    EngineFailure,
    EngineUnavailable,
    GatewayError,
    InvalidRequest,
    NotFound,
    RateLimited,
)

__all__ = ["LocalEngine", "resolve_dtype", "resolve_quantization"]

log = structlog.get_logger(__name__)


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` picks bf16 where the hardware computes it natively (CUDA, or CPUs with AVX512-BF16/AMX),
    since decoding is bound by the bytes of weights read per token; fp32 elsewhere."""
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


def resolve_quantization(name: str, dtype: torch.dtype, model_dir: Path) -> Scheme | None:
    """`auto` quantizes the decode copy only as far as the GGUF the model came from already was (so it loses
    nothing new), and only where the kernels are fast: bf16 on the CPU."""
    if name == "none":
        return None
    if name != "auto":
        if dtype != torch.bfloat16 or torch.cuda.is_available():
            raise EngineFailure(f"engine.quantization = {name} needs models.dtype bfloat16 on the CPU")
        return "int4" if name == "int4" else "int8"
    if dtype != torch.bfloat16 or torch.cuda.is_available():
        return None
    from finetune.base_model import gguf_weight_bits

    bits = gguf_weight_bits(model_dir)
    if bits is None or bits > 8:
        return None
    return "int4" if bits <= 4 else "int8"


@dataclass
class _Sequence:
    group: _Group
    index: int
    sampler: SequenceSampler
    detok: IncrementalDetokenizer
    stops: StopMatcher
    slot: int = -1
    length: int = 0  # tokens in the KV cache
    next_token: int | None = None  # sampled, not yet fed to the model
    generated: int = 0
    done: bool = False


@dataclass
class _Group:
    """One request: n sequences sharing a prompt, one asyncio queue back to the caller."""

    request_id: str
    prompt: list[int]
    max_tokens: int
    adapter: LoraAdapter | None
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[list[ChoiceDelta] | BaseException]
    sequences: list[_Sequence] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens already in the cache of the first sequence
    aborted: bool = False

    def send(self, item: list[ChoiceDelta] | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the caller's loop is gone; nothing left to tell
            self.aborted = True


class _Stream:
    def __init__(self, engine: LocalEngine, group: _Group) -> None:
        self._engine = engine
        self._group = group
        self.prompt_tokens = len(group.prompt)
        self._finished = 0

    async def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        n = len(self._group.sequences)
        try:
            while self._finished < n:
                item = await self._group.out.get()
                if isinstance(item, BaseException):
                    raise item
                for delta in item:
                    if delta.finish_reason is not None:
                        self._finished += 1
                    yield delta
        finally:
            if self._finished < n:
                self._engine.abort(self._group.request_id)

    async def aclose(self) -> None:
        if self._finished < len(self._group.sequences):
            self._engine.abort(self._group.request_id)


class LocalEngine:
    """Engine over a local transformers model directory (see runner.py for supported architectures)."""

    def __init__(
        self,
        model_name: str,
        model_dir: Path,
        *,
        dtype: str = "auto",
        max_running: int = 16,
        max_queued: int = 64,
        max_model_len: int = 2048,
        prefill_token_budget: int = 1024,
        default_max_tokens: int = 512,
        max_adapters: int = 8,
        threads: int = 0,
        quantization: str = "none",
        quantized_max_rows: int = 16,
    ) -> None:
        self.model_name = model_name
        self.model_dir = model_dir
        self.dtype = resolve_dtype(dtype)
        self.max_running = max_running
        self.max_queued = max_queued
        self.requested_model_len = max_model_len
        self.max_model_len = max_model_len
        self.prefill_token_budget = prefill_token_budget
        self.default_max_tokens = default_max_tokens
        self.max_adapters = max_adapters
        self.threads = threads
        self.quantization_setting = quantization
        self.quantized_max_rows = quantized_max_rows
        self.quantization: Scheme | None = None
        self.tokenizer: Any = None
        self._runner: ModelRunner | None = None
        self._stop_ids: set[int] = set()
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._adapters: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._adapter_lock = threading.Lock()
        self._waiting: deque[_Group] = deque()
        self._running: list[_Sequence] = []  # index == slot
        self._groups: dict[str, _Group] = {}
        self._queued = 0
        self._queued_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._ids = itertools.count()

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the model (about a second for a converted model) and start the scheduler thread."""
        from finetune.base_model import load_model, load_tokenizer

        if self.threads:
            torch.set_num_threads(self.threads)
        started = time.perf_counter()
        self.tokenizer = load_tokenizer(self.model_dir)
        model = load_model(self.model_dir, dtype="float32")
        context = getattr(model.config, "max_position_embeddings", None) or self.requested_model_len
        self.max_model_len = min(self.requested_model_len, int(context))
        self.quantization = resolve_quantization(self.quantization_setting, self.dtype, self.model_dir)
        self._runner = ModelRunner(
            model,
            max_slots=self.max_running,
            max_model_len=self.max_model_len,
            dtype=self.dtype,
            quantization=self.quantization,
            quantized_max_rows=self.quantized_max_rows,
        )
        del model  # the runner keeps its own (fused, possibly bf16) copies of the weights
        self._stop_ids = _stop_token_ids(self.tokenizer, self.model_dir)
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()
        self._ready.set()
        log.info(
            "engine.started",
            model=self.model_name,
            dtype=str(self.dtype),
            quantization=self.quantization or "none",
            seconds=round(time.perf_counter() - started, 2),
        )

    def shutdown(self) -> None:
        if self._thread is not None:
            self._commands.put(("stop", None))
            self._thread.join(timeout=10)
            self._thread = None
        self._ready.clear()

    def is_ready(self) -> bool:
        return (
            self._ready.is_set()
            and self._failed is None
            and self._thread is not None
            and self._thread.is_alive()
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self._running),
            queued=self._queued,
            adapters=len(self._adapters),
            max_running=self.max_running,
            max_queued=self.max_queued,
        )

    # -- adapters ----------------------------------------------------------------------------------------

    def add_adapter(self, name: str, path: Path) -> None:
        """Load a peft adapter; in-flight sequences keep the adapter objects they started with."""
        if self._runner is None:
            raise EngineUnavailable("the engine is not started")
        adapter = LoraAdapter.load(name, path, num_layers=len(self._runner.layers), dtype=self.dtype)
        with self._adapter_lock:
            self._adapters[name] = adapter
            self._adapters.move_to_end(name)
            while len(self._adapters) > self.max_adapters:
                evicted, _ = self._adapters.popitem(last=False)
                log.info("engine.adapter_evicted", adapter=evicted)

    def remove_adapter(self, name: str) -> None:
        with self._adapter_lock:
            self._adapters.pop(name, None)

    def has_adapter(self, name: str) -> bool:
        with self._adapter_lock:
            return name in self._adapters

    # -- requests ----------------------------------------------------------------------------------------

    def tokenize(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            try:
                encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except Exception as exc:  # a template that rejects a role order, for example
                raise InvalidRequest(
                    f"the model's chat template rejected the messages: {exc}", param="messages"
                ) from exc
            ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
            return list(ids)
        return list(self.tokenizer(request.prompt or "", add_special_tokens=False)["input_ids"])

    async def submit(self, request: GenerationRequest) -> _Stream:
        if not self.is_ready():
            raise EngineUnavailable("the engine is not ready; retry shortly")
        if request.model != self.model_name:
            raise NotFound(
                f"The model '{request.model}' does not exist", param="model", code="model_not_found"
            )
        adapter = None
        if request.adapter is not None:
            with self._adapter_lock:
                adapter = self._adapters.get(request.adapter)
                if adapter is not None:
                    self._adapters.move_to_end(request.adapter)
            if adapter is None:
                raise NotFound(
                    f"The model '{request.adapter}' is not loaded", param="model", code="model_not_found"
                )
        prompt = self.tokenize(request)
        if not prompt:
            raise InvalidRequest(
                "the prompt is empty", param="prompt" if request.prompt is not None else "messages"
            )
        room = self.max_model_len - len(prompt)
        max_tokens = request.sampling.max_tokens
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, room)
        if room < 1 or max_tokens > room:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion.",
                param="messages" if request.messages is not None else "prompt",
            )
        if request.n > self.max_running:
            raise InvalidRequest(f"n must be at most {self.max_running} on this server", param="n")
        with self._queued_lock:
            if self._queued >= self.max_queued:
                raise RateLimited(
                    "The engine queue is full; retry shortly", retry_after=1, code="engine_overloaded"
                )
            self._queued += 1
        loop = asyncio.get_running_loop()
        group = _Group(
            request_id=f"{request.request_id}-{next(self._ids)}",
            prompt=prompt,
            max_tokens=max_tokens,
            adapter=adapter,
            loop=loop,
            out=asyncio.Queue(),
        )
        for index in range(request.n):
            params = request.sampling
            if params.seed is not None and index:
                params = _with_seed(params, params.seed + index)
            group.sequences.append(
                _Sequence(
                    group=group,
                    index=index,
                    sampler=SequenceSampler(params),
                    detok=IncrementalDetokenizer(self.tokenizer),
                    stops=StopMatcher(params.stop),
                )
            )
        self._commands.put(("add", group))
        return _Stream(self, group)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    # -- the scheduler thread ----------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            idle = not self._running and not self._waiting
            try:
                if not self._drain(block=idle):
                    return
                self._admit()
                if self._running:
                    self._step()
            except Exception as exc:  # keep serving: fail what was in flight, reset, go on
                log.error("engine.step_failed", error_type=type(exc).__name__)
                self._fail_all(EngineFailure("the engine failed while generating; the request was aborted"))

    def _drain(self, *, block: bool) -> bool:
        while True:
            try:
                kind, payload = self._commands.get(block=block, timeout=None)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                self._fail_all(EngineUnavailable("the engine is shutting down"))
                return False
            if kind == "add":
                self._waiting.append(payload)
                self._groups[payload.request_id] = payload
            elif kind == "abort":
                group = self._groups.get(payload)
                if group is not None:
                    group.aborted = True
                    self._finish_group(group)

    def _admit(self) -> None:
        while self._waiting:
            group = self._waiting[0]
            if not group.aborted and len(self._running) + len(group.sequences) > self.max_running:
                return
            self._waiting.popleft()
            with self._queued_lock:
                self._queued -= 1
            if group.aborted:
                continue
            for seq in group.sequences:
                seq.slot = len(self._running)
                self._running.append(seq)

    def _step(self) -> None:
        assert self._runner is not None
        batch = StepBatch()
        decoding: list[_Sequence] = []
        prefilling: list[_Group] = []
        budget = self.prefill_token_budget
        for seq in self._running:
            if seq.next_token is not None:
                decoding.append(seq)
                batch.decode_slots.append(seq.slot)
                batch.decode_tokens.append(seq.next_token)
                batch.decode_positions.append(seq.length)
                batch.decode_adapters.append(seq.group.adapter)
                budget -= 1
        for seq in self._running:
            group = seq.group
            if seq.index != 0 or group.prefilled >= len(group.prompt) or budget <= 0:
                continue
            chunk = group.prompt[group.prefilled : group.prefilled + budget]
            last = group.prefilled + len(chunk) == len(group.prompt)
            batch.prefills.append(
                PrefillSegment(seq.slot, group.prefilled, chunk, group.adapter, wants_logits=last)
            )
            budget -= len(chunk)
            prefilling.append(group)
        logits = self._runner.step(batch)

        rows: list[_Sequence] = list(decoding)
        row_logits = [logits[: len(decoding)]]
        cursor = len(decoding)
        for seg, group in zip(batch.prefills, prefilling, strict=True):
            group.prefilled += len(seg.token_ids)
            first = group.sequences[0]
            first.length = group.prefilled
            if not seg.wants_logits:
                continue
            for sibling in group.sequences[1:]:  # n > 1: share the prompt's cache instead of recomputing it
                self._runner.move_slot(first.slot, sibling.slot, first.length)
                sibling.length = first.length
            rows.extend(group.sequences)
            row_logits.append(logits[cursor : cursor + 1].expand(len(group.sequences), -1))
            cursor += 1
        for seq in decoding:
            seq.length += 1
        if not rows:
            return
        result = sample_batch(torch.cat(row_logits), [s.sampler for s in rows])
        deltas: dict[str, list[ChoiceDelta]] = {}
        for row, seq in enumerate(rows):
            delta = self._advance(seq, result.token_ids[row], result, row)
            if delta is not None:
                deltas.setdefault(seq.group.request_id, []).append(delta)
        for request_id, items in deltas.items():
            owner = self._groups.get(request_id)
            if owner is not None:
                owner.send(items)
                if all(s.done for s in owner.sequences):
                    self._finish_group(owner)

    def _advance(self, seq: _Sequence, token: int, result: Any, row: int) -> ChoiceDelta | None:
        seq.generated += 1
        finish: FinishReason | None = None
        if token in self._stop_ids and not seq.sampler.params.ignore_eos:
            text, finish = seq.stops.flush(), "stop"
        else:
            text, hit = seq.stops.feed(seq.detok.push(token))
            if hit:
                finish = "stop"
            elif seq.generated >= seq.group.max_tokens:
                text, finish = text + seq.stops.flush(), "length"
        logprobs = None
        if seq.sampler.params.logprobs and result.logprobs is not None:
            logprobs = [self._logprob(token, result.logprobs[row], result.top[row] if result.top else [])]
        if finish is None:
            seq.next_token = token
        else:
            seq.done = True
            seq.next_token = None
        if not text and finish is None and logprobs is None:
            return None
        return ChoiceDelta(index=seq.index, text=text, token_count=1, logprobs=logprobs, finish_reason=finish)

    def _logprob(self, token: int, value: float, top: list[tuple[int, float]]) -> TokenLogprob:
        def piece(t: int) -> tuple[str, list[int]]:
            text = self.tokenizer.decode([t])
            return text, list(text.encode("utf-8"))

        text, raw = piece(token)
        return TokenLogprob(text, value, raw, [(*piece(t), lp) for t, lp in top])

    def _finish_group(self, group: _Group) -> None:
        self._groups.pop(group.request_id, None)
        for seq in group.sequences:
            seq.done = True
            if seq.slot >= 0:
                self._release(seq)

    def _release(self, seq: _Sequence) -> None:
        """Free a slot, moving the last running sequence into it so slots stay dense."""
        assert self._runner is not None
        hole = seq.slot
        seq.slot = -1
        last = self._running.pop()
        if last is not seq:
            self._runner.move_slot(last.slot, hole, last.length)
            last.slot = hole
            self._running[hole] = last

    def _fail_all(self, error: GatewayError) -> None:
        for group in list(self._groups.values()):
            group.send(error)
            self._finish_group(group)
        self._waiting.clear()
        self._running.clear()
        with self._queued_lock:
            self._queued = 0


def _with_seed(params: Any, seed: int) -> Any:
    from dataclasses import replace

    return replace(params, seed=seed)


def _stop_token_ids(tokenizer: Any, model_dir: Path) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except OSError:
        pass
    return ids
