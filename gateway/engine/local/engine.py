"""The in-process engine: the Engine protocol over a local transformers model directory.

`start()` starts the engine thread, which loads the model into a ModelRunner and runs continuous batching
(scheduler.py) over it.  The async app calls `submit()`, which validates the request before it queues (so a
bad request fails fast), hands it to the thread and returns a stream of deltas; adapters are loaded on the
engine thread too, between steps, and referenced by the requests.

Tokenizing never runs on the event loop: a 1 MiB body of 36k tiny messages held it for a second.  `submit`
first rejects by a cheap bound (no tokenizer: more messages than the context has tokens, or more characters
than the context times the longest token in the vocabulary: either cannot fit), then tokenizes on one
dedicated thread (`tokenize` pool) so a flood of large prompts queues there, not in front of /healthz.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, TypeVar

import structlog
import torch

from gateway.core.errors import (
    ContextLengthExceeded,
    EngineUnavailable,
    InvalidRequest,
    NotFound,
    RateLimited,
)
from gateway.engine.base import ChoiceDelta, EngineStats, GenerationRequest
from gateway.engine.local.chat_template import render_prompt
from gateway.engine.local.detokenizer import IncrementalDetokenizer, StopMatcher
from gateway.engine.local.grammar import GrammarCompiler, RowGrammar
from gateway.engine.local.lora import LoraAdapter
from gateway.engine.local.precision import (
    resolve_device,
    resolve_dtype,
    resolve_quantization,
    resolve_quantized_max_rows,
)
from gateway.engine.local.quantized import Scheme
from gateway.engine.local.runner import ModelRunner
from gateway.engine.local.sampling import SequenceSampler
from gateway.engine.local.scheduler import Group, Scheduler, Sequence
from gateway.engine.local.sizing import (
    EngineSizing,
    Machine,
    ModelShape,
    Requested,
    host_memory_available,
    size_engine,
    usable_cores,
)

__all__ = ["LocalEngine"]

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

REBUILD_ATTEMPTS = 3
REBUILD_BACKOFF_SECONDS = 1.0


class _Stream:
    def __init__(self, engine: LocalEngine, group: Group) -> None:
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
    """Engine over a local transformers model directory (see runner.py for supported architectures).

    `model_dir` is the directory, or a function that returns it once it exists: it runs first on the engine
    thread, so converting a GGUF (torch work) stays on that thread too (see `_run`).

    `max_running`, `max_queued`, `prefill_token_budget` and `tenant_concurrency` may be None (auto): they are
    sized at start-up from the model, the memory and the cores (sizing.py), which also refuses configured
    values whose KV cache cannot fit; `sizing` holds the outcome."""

    def __init__(
        self,
        model_name: str,
        model_dir: Path | Callable[[], Path],
        *,
        dtype: str = "auto",
        device: str = "auto",
        max_running: int | None = 16,
        max_queued: int | None = 64,
        max_model_len: int = 2048,
        prefill_token_budget: int | None = 1024,
        tenant_concurrency: int | None = None,
        memory_fraction: float = 0.5,
        default_max_tokens: int = 512,
        max_adapters: int = 8,
        threads: int = 0,
        quantization: str = "none",
        quantized_max_rows: int | None = None,
    ) -> None:
        self.model_name = model_name
        self._model_source = model_dir
        self.model_dir: Path | None = model_dir if isinstance(model_dir, Path) else None
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self._requested = Requested(
            max_model_len=max_model_len,
            max_running=max_running,
            max_queued=max_queued,
            prefill_token_budget=prefill_token_budget,
            tenant_concurrency=tenant_concurrency,
            memory_fraction=memory_fraction,
        )
        self.sizing: EngineSizing | None = None  # set at start-up
        # placeholders until start-up sizes them (auto): what stats() reports while the model loads
        self.max_running = max_running or 0
        self.max_queued = max_queued or 0
        self.requested_model_len = max_model_len
        self.max_model_len = max_model_len
        self.prefill_token_budget = prefill_token_budget or 0
        self.default_max_tokens = default_max_tokens
        self.max_adapters = max_adapters
        self.threads = threads
        self.quantization_setting = quantization
        self.quantized_max_rows = resolve_quantized_max_rows(quantized_max_rows, self.dtype)
        self.quantization: Scheme | None = None
        self.tokenizer: Any = None
        self.grammars: GrammarCompiler | None = None  # built with the tokenizer, on the engine thread
        self._scheduler: Scheduler | None = None
        self._adapters: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._adapter_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self.restarts = 0  # runners rebuilt after repeated failed steps
        self._num_layers = 0
        self._ids = itertools.count()
        self._max_chars_per_token = 1  # the vocabulary's longest token, known once the tokenizer loads
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; it loads the model (about a second for a converted model), then runs the
        scheduler.  Returns once the engine serves; raises what loading raised."""
        started = time.perf_counter()
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        booted: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(booted,), name="engine", daemon=True)
        self._thread.start()
        booted.result()
        self._ready.set()
        log.info(
            "engine.started",
            model=self.model_name,
            device=str(self.device),
            dtype=str(self.dtype),
            quantization=self.quantization or "none",
            seconds=round(time.perf_counter() - started, 2),
        )

    def _run(self, booted: Future[None]) -> None:
        """The engine thread's body.  Every torch op of the serving process runs on this thread, loading
        included: libgomp gives each thread that runs a parallel op a pool of its own, and once a process
        holds more pool threads than cores it stops spinning between parallel regions, which made each
        decode step 1.5x slower on 2 cores (13.5 -> 21 ms measured).  For the same reason a runner that has
        to be rebuilt is rebuilt here, not on a new thread."""
        try:
            scheduler = self._scheduler = self._boot()
        except BaseException as exc:
            booted.set_exception(exc)
            return
        booted.set_result(None)
        try:
            while not scheduler.run():
                if not self._rebuild(scheduler):
                    return
        except BaseException as exc:  # the loop itself broke: never leave callers waiting on a dead thread
            self._give_up(scheduler, exc)

    def _boot(self) -> Scheduler:
        from contracts.base_models import load_tokenizer

        if self.threads:
            torch.set_num_threads(self.threads)
        source = self._model_source
        model_dir = self.model_dir = source if isinstance(source, Path) else source()
        self.tokenizer = load_tokenizer(model_dir)
        self._max_chars_per_token = _longest_token_chars(self.tokenizer)
        self._size(model_dir)
        runner = self._build_runner(model_dir)
        stop_ids = _stop_token_ids(self.tokenizer, model_dir)
        self.grammars = GrammarCompiler(self.tokenizer, runner.vocab_size, stop_ids)
        return Scheduler(
            runner,
            self.tokenizer,
            stop_ids,
            max_running=self.max_running,
            prefill_token_budget=self.prefill_token_budget,
        )

    def _size(self, model_dir: Path) -> None:
        """Size the batch, prefill step and queue for this model on this machine (sizing.py), before any
        weight is loaded, so a KV cache that cannot fit is a start-up error, not an out-of-memory later."""
        from dataclasses import replace

        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model_dir))
        context = getattr(config, "max_position_embeddings", None) or self.requested_model_len
        self.max_model_len = min(self.requested_model_len, int(context))
        self.quantization = resolve_quantization(
            self.quantization_setting, self.dtype, model_dir, self.device
        )
        if self.device.type == "cuda":
            memory = torch.cuda.mem_get_info(self.device)[0]
            cores = usable_cores(threads=self.threads)
        else:
            memory, cores = host_memory_available(), usable_cores(threads=self.threads)
        shape = ModelShape.from_config(config, dtype_bytes=torch.empty((), dtype=self.dtype).element_size())
        requested = replace(self._requested, max_model_len=self.max_model_len, quantization=self.quantization)
        sizing = self.sizing = size_engine(shape, Machine(self.device.type, memory, cores), requested)
        self.max_running, self.max_queued = sizing.max_running, sizing.max_queued
        self.prefill_token_budget = sizing.prefill_token_budget
        log.info("engine.sized", model=self.model_name, **sizing.log_fields())

    def _build_runner(self, model_dir: Path) -> ModelRunner:
        from contracts.base_models import load_model

        # Loaded on the host (outside inference mode: it makes nn.Parameters); the runner copies the weights
        # to the device.  fp32 on the CPU (the runner rounds once, to its dtype); on CUDA the engine dtype
        # already, so a 7B model takes 15 GB of host memory on its way to the GPU, not 30.
        load_dtype = self.dtype if self.device.type == "cuda" else torch.float32
        model = load_model(model_dir, dtype=load_dtype)  # max_model_len and quantization: see _size
        with torch.inference_mode():  # the runner's tensors are the engine's: see scheduler.py
            runner = ModelRunner(
                model,
                max_slots=self.max_running,
                max_model_len=self.max_model_len,
                dtype=self.dtype,
                device=self.device,
                quantization=self.quantization,
                quantized_max_rows=self.quantized_max_rows,
            )
        del model  # the runner keeps its own (fused, possibly bf16) copies of the weights
        self._num_layers = len(runner.layers)
        return runner

    def _rebuild(self, scheduler: Scheduler) -> bool:
        """Steps kept failing: load the model into a new runner, a few tries with backoff.  The queues and
        the loaded adapters (read-only tensors) are kept, so waiting requests are served once it is back.
        False when every try failed: the engine gives up (see `is_failed`)."""
        self._ready.clear()  # /readyz answers 503 meanwhile; requests still queue
        scheduler.runner = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the old runner's cache blocks, before the new one allocates its own
        error: BaseException | None = None
        for attempt in range(REBUILD_ATTEMPTS):
            if attempt:
                time.sleep(REBUILD_BACKOFF_SECONDS * 2 ** (attempt - 1))
            started = time.perf_counter()
            try:
                assert self.model_dir is not None
                scheduler.runner = self._build_runner(self.model_dir)
            except Exception as exc:
                error = exc
                log.error("engine.rebuild_failed", attempt=attempt + 1, error_type=type(exc).__name__)
                continue
            self.restarts += 1
            self._ready.set()
            log.warning(
                "engine.rebuilt",
                model=self.model_name,
                restarts=self.restarts,
                seconds=round(time.perf_counter() - started, 2),
            )
            return True
        self._give_up(scheduler, error or RuntimeError("rebuild failed"))
        return False

    def _give_up(self, scheduler: Scheduler, exc: BaseException) -> None:
        log.critical("engine.failed", model=self.model_name, error_type=type(exc).__name__)
        self._failed = exc
        self._ready.clear()
        scheduler.close(EngineUnavailable("the engine stopped after repeated failures; retry shortly"))

    def shutdown(self) -> None:
        if self._thread is not None and self._scheduler is not None:
            self._scheduler.stop()
            self._thread.join(timeout=10)
            self._thread = None
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self._ready.clear()

    def is_ready(self) -> bool:
        return self._ready.is_set() and self._accepting()

    def is_failed(self) -> bool:
        return self._failed is not None

    def _accepting(self) -> bool:
        """Requests may queue: the thread runs and has not given up (it may be rebuilding the runner)."""
        return (
            self._scheduler is not None
            and self._failed is None
            and self._thread is not None
            and self._thread.is_alive()
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            running=self._scheduler.running if self._scheduler else 0,
            queued=self._scheduler.queued if self._scheduler else 0,
            adapters=len(self._adapters),
            max_running=self.max_running,
            max_queued=self.max_queued,
            restarts=self.restarts,
            failed_steps=self._scheduler.failed_steps if self._scheduler else 0,
            prefill_token_budget=self.prefill_token_budget,
            kv_cache_tokens=self.sizing.kv_cache_tokens if self.sizing else 0,
            kv_cache_bytes=self.sizing.kv_cache_bytes if self.sizing else 0,
            tenant_concurrency=self.sizing.tenant_concurrency if self.sizing else 0,
        )

    # -- adapters ----------------------------------------------------------------------------------------

    def add_adapter(self, name: str, path: Path) -> None:
        """Load a peft adapter; in-flight sequences keep the adapter objects they started with."""
        if self._scheduler is None:
            raise EngineUnavailable("the engine is not started")
        layers = self._num_layers
        adapter = self._on_engine_thread(
            lambda: LoraAdapter.load(name, path, num_layers=layers, dtype=self.dtype, device=self.device)
        )
        with self._adapter_lock:
            self._adapters[name] = adapter
            self._adapters.move_to_end(name)
            while len(self._adapters) > self.max_adapters:
                evicted, _ = self._adapters.popitem(last=False)
                log.info("engine.adapter_evicted", adapter=evicted)

    def _on_engine_thread(self, fn: Callable[[], _T]) -> _T:
        """Run `fn` on the engine thread between two steps (see `_run` for why torch work goes there)."""
        assert self._scheduler is not None
        result: Future[_T] = Future()
        self._scheduler.call(fn, result)
        while True:
            try:
                return result.result(timeout=1.0)
            except FutureTimeout:
                if not self._accepting():  # stopped before it got to the call
                    raise EngineUnavailable("the engine stopped") from None

    def remove_adapter(self, name: str) -> None:
        with self._adapter_lock:
            self._adapters.pop(name, None)

    def has_adapter(self, name: str) -> bool:
        with self._adapter_lock:
            return name in self._adapters

    # -- requests ----------------------------------------------------------------------------------------

    def tokenize(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            return render_prompt(self.tokenizer, request.messages, request.tools)
        return list(self.tokenizer(request.prompt or "", add_special_tokens=False)["input_ids"])

    def _reject_by_cheap_bound(self, request: GenerationRequest) -> None:
        """Refuse, without the tokenizer, a prompt that cannot fit: each message costs at least one token,
        and no token covers more characters than the vocabulary's longest."""
        if request.messages is not None:
            count = len(request.messages)
            chars = sum(len(m.content) for m in request.messages)
        else:
            count, chars = 0, len(request.prompt or "")
        limit = self.max_model_len
        if count > limit or chars > limit * self._max_chars_per_token:
            what = f"{count} messages" if count > limit else f"{chars} characters"
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, your request has {what}, "
                "more than fit in it. Please reduce the length of the messages.",
                param="messages" if request.messages is not None else "prompt",
            )

    async def submit(self, request: GenerationRequest) -> _Stream:
        if not self._accepting():
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
        self._reject_by_cheap_bound(request)
        prompt = await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, self.tokenize, request)
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
        compiled = None
        if request.grammar is not None:
            assert self.grammars is not None  # built before the engine accepts requests
            compiled = await self.grammars.compile_async(request.grammar)
        assert self._scheduler is not None  # _accepting() said so
        group = Group(
            request_id=f"{request.request_id}-{next(self._ids)}",
            prompt=prompt,
            max_tokens=max_tokens,
            adapter=adapter,
            loop=asyncio.get_running_loop(),
            out=asyncio.Queue(),
        )
        for index in range(request.n):
            params = request.sampling
            if params.seed is not None and index:
                params = _with_seed(params, (params.seed + index) % 2**64)  # torch takes [0, 2^64)
            group.sequences.append(
                Sequence(
                    group=group,
                    index=index,
                    sampler=SequenceSampler(params, grammar=RowGrammar(compiled) if compiled else None),
                    detok=IncrementalDetokenizer(self.tokenizer),
                    stops=StopMatcher(params.stop),
                )
            )
        if not self._scheduler.enqueue(group, max_queued=self.max_queued):
            raise RateLimited(
                "The engine queue is full; retry shortly", retry_after=1, code="engine_overloaded"
            )
        return _Stream(self, group)

    def abort(self, request_id: str) -> None:
        if self._scheduler is not None:
            self._scheduler.abort(request_id)


def _longest_token_chars(tokenizer: Any) -> int:
    """Characters of the vocabulary's longest token: an upper bound on the characters one token covers
    (a byte-level token's characters are bytes, and a character is at least one byte)."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # a tokenizer without a vocabulary to read: a bound that still stops a mebibyte
        return 64
    return max((len(token) for token in vocab), default=1) or 1


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
