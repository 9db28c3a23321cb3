"""The in-process embedding engine: a sentence-transformers-style encoder on a thread of its own.

    engine = LocalEmbedder("all-minilm-l6-v2", model_dir)
    engine.start()
    result = await engine.embed(["first text", "second text"])    # result.vectors: (2, 384) float32

`embed()` tokenizes and checks the inputs off the event loop (a worker thread, with a tokenizer of the
engine's own whose truncation and padding are off: a too-long input is refused, never cut), then queues
them.  The engine thread owns the model and runs every torch op of it, under `torch.inference_mode()`, in
fp32: it waits `batch_wait_ms` for company when idle, then takes up to `max_batch` inputs, one from each
waiting request in turn (so a request of 2000 inputs does not hold up a request of one), pads them into one
forward pass, pools each row as the model's configuration says (contracts/embedding_models.py) and hands
every request its rows the moment its last one is done.  It is not the chat engine's thread: a long chat
step never delays an embedding, and the reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import structlog
import torch

from contracts.embedding_models import PoolingConfig, read_pooling_config
from gateway.core.errors import (
    ContextLengthExceeded,
    EngineFailure,
    EngineUnavailable,
    InvalidRequest,
    RateLimited,
)
from gateway.engine.embeddings import EmbeddingInputs, EmbeddingResult, EmbeddingStats

__all__ = ["LocalEmbedder", "pool"]

log = structlog.get_logger(__name__)


def pool(hidden: torch.Tensor, mask: torch.Tensor, config: PoolingConfig) -> torch.Tensor:
    """(batch, tokens, hidden) token states and their 0/1 attention mask -> (batch, hidden), exactly as
    sentence-transformers' Pooling (and Normalize) modules compute it."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if config.mode == "cls":
        pooled = hidden[:, 0]
    elif config.mode == "max":
        pooled = hidden.masked_fill(weights == 0, -1e9).max(dim=1).values
    else:
        summed = (hidden * weights).sum(dim=1)
        counts = weights.sum(dim=1).clamp(min=1e-9)
        pooled = summed / (counts.sqrt() if config.mode == "mean_sqrt_len" else counts)
    if config.normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return pooled


@dataclass(eq=False)
class _Job:
    """One request's inputs on their way through the engine."""

    ids: list[list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[EmbeddingResult]
    out: npt.NDArray[np.float32]
    order: list[int] = field(default_factory=list)  # indices, longest first: batches of like lengths
    taken: int = 0
    done: int = 0
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.order = sorted(range(len(self.ids)), key=lambda i: -len(self.ids[i]))


class LocalEmbedder:
    """EmbeddingEngine over a local sentence-transformers-style directory.  `model_dir` may be a function
    that returns it (unpacking the embedded zip): it runs first on the engine thread."""

    def __init__(
        self,
        model_name: str,
        model_dir: Path | Callable[[], Path],
        *,
        max_batch: int = 32,
        batch_wait_ms: float = 2.0,
        max_queued: int = 4096,
        threads: int = 0,
        device: str = "cpu",
    ) -> None:
        self.model_name = model_name
        self._source = model_dir
        self.max_batch = max(1, max_batch)
        self.batch_wait = max(0.0, batch_wait_ms) / 1000
        self.max_queued = max_queued
        self.threads = threads
        self.device = torch.device(device)
        self.dimensions = 0
        self.max_input_tokens = 0
        self.normalized = False
        self.vocab_size = 0
        self.pooling: PoolingConfig | None = None
        self._tokenizer: Any = None  # a tokenizers.Tokenizer of our own: truncation and padding off
        self._pad_id = 0
        self._model: Any = None
        self._cond = threading.Condition()
        self._incoming: list[_Job] = []
        self._active: deque[_Job] = deque()  # the engine thread's: requests with inputs left to embed
        self._queued = 0  # inputs accepted and not yet embedded
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._batches = 0
        self._inputs = 0

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread and load the model on it; returns once it serves, raises what loading
        raised."""
        started = time.perf_counter()
        booted: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(booted,), name="embedder", daemon=True)
        self._thread.start()
        booted.result()
        self._ready.set()
        log.info(
            "embedder.started",
            model=self.model_name,
            dimensions=self.dimensions,
            max_input_tokens=self.max_input_tokens,
            pooling=self.pooling.mode if self.pooling else None,
            device=str(self.device),
            seconds=round(time.perf_counter() - started, 2),
        )

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._ready.clear()

    def is_ready(self) -> bool:
        return self._ready.is_set() and self._thread is not None and self._thread.is_alive()

    def stats(self) -> EmbeddingStats:
        return EmbeddingStats(queued=self._queued, batches=self._batches, inputs=self._inputs)

    def _run(self, booted: Future[None]) -> None:
        try:
            self._load()
        except BaseException as exc:
            booted.set_exception(exc)
            return
        booted.set_result(None)
        try:
            self._serve()
        finally:
            self._fail_all(EngineUnavailable("the embedding engine stopped; retry shortly"))

    def _load(self) -> None:
        from tokenizers import Tokenizer
        from transformers import AutoModel, AutoTokenizer

        if self.threads:
            torch.set_num_threads(self.threads)
        source = self._source
        model_dir = source if isinstance(source, Path) else source()
        self.pooling = read_pooling_config(model_dir)
        loaded = AutoTokenizer.from_pretrained(str(model_dir))
        if not getattr(loaded, "is_fast", False):
            raise RuntimeError(f"{model_dir}: the embedding engine needs a fast (tokenizers) tokenizer")
        tokenizer = Tokenizer.from_str(loaded.backend_tokenizer.to_str())
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self._pad_id = loaded.pad_token_id or 0
        model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).to(self.device)
        model.eval()
        self._model = model
        config = model.config
        positions = int(getattr(config, "max_position_embeddings", 512) or 512)
        self.max_input_tokens = min(self.pooling.max_seq_length or positions, positions)
        self.dimensions = int(config.hidden_size)
        self.normalized = self.pooling.normalize
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)

    # -- requests (event loop side) ----------------------------------------------------------------------

    async def embed(self, inputs: EmbeddingInputs) -> EmbeddingResult:
        if not self.is_ready():
            raise EngineUnavailable("the embedding engine is not ready; retry shortly")
        ids = await asyncio.to_thread(self._token_ids, inputs)
        loop = asyncio.get_running_loop()
        job = _Job(ids, loop, loop.create_future(), np.empty((len(ids), self.dimensions), np.float32))
        with self._cond:
            if self._stopping:
                raise EngineUnavailable("the embedding engine is stopping")
            if self._queued + len(ids) > self.max_queued:
                raise RateLimited(
                    "The embedding queue is full; retry shortly", retry_after=1, code="engine_overloaded"
                )
            self._queued += len(ids)
            self._incoming.append(job)
            self._cond.notify()
        try:
            return await job.future
        finally:
            job.cancelled = True  # a client that went away: its remaining inputs are skipped

    def _token_ids(self, inputs: EmbeddingInputs) -> list[list[int]]:
        """Strings -> token ids (special tokens added, as the model was trained); token ids are checked and
        used as given.  Every input is checked; the first bad one is named by its index."""
        ids: list[list[int]]
        if inputs and isinstance(inputs[0], str):
            texts = inputs
            for index, text in enumerate(texts):
                if not text:
                    raise InvalidRequest(f"Input {index} is an empty string.", param="input")
            ids = [encoding.ids for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=True)]
        else:
            ids = cast(list[list[int]], inputs)
            for index, tokens in enumerate(ids):
                if not tokens:
                    raise InvalidRequest(f"Input {index} is an empty list of tokens.", param="input")
                bad = next((t for t in tokens if not 0 <= t < self.vocab_size), None)
                if bad is not None:
                    raise InvalidRequest(
                        f"Input {index} holds token id {bad}, outside this model's vocabulary "
                        f"(0 to {self.vocab_size - 1}).",
                        param="input",
                    )
        for index, tokens in enumerate(ids):
            if len(tokens) > self.max_input_tokens:
                raise ContextLengthExceeded(
                    f"Input {index} is {len(tokens)} tokens long; the model {self.model_name!r} takes at "
                    f"most {self.max_input_tokens} tokens per input. Please shorten or split it.",
                    param="input",
                )
        return ids

    # -- the engine thread -------------------------------------------------------------------------------

    def _serve(self) -> None:
        active = self._active
        while True:
            with self._cond:
                if not active:
                    while not self._incoming and not self._stopping:
                        self._cond.wait()
                    self._wait_for_company()
                if self._stopping:
                    return
                active.extend(self._incoming)
                self._incoming.clear()
            batch = self._take(active)
            if batch:
                self._embed_batch(batch)

    def _wait_for_company(self) -> None:
        """Idle and one request came in: give others `batch_wait` to join its batch (under the lock)."""
        deadline = time.monotonic() + self.batch_wait
        while not self._stopping and sum(len(j.ids) for j in self._incoming) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _take(self, active: deque[_Job]) -> list[tuple[_Job, int]]:
        """Up to max_batch inputs, one from each active request in turn."""
        batch: list[tuple[_Job, int]] = []
        while active and len(batch) < self.max_batch:
            job = active.popleft()
            if job.cancelled:
                self._release(len(job.ids) - job.taken)
                continue
            batch.append((job, job.order[job.taken]))
            job.taken += 1
            if job.taken < len(job.ids):
                active.append(job)
        return batch

    def _embed_batch(self, batch: list[tuple[_Job, int]]) -> None:
        assert self.pooling is not None
        rows = [job.ids[index] for job, index in batch]
        try:
            longest = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), longest), self._pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), longest), dtype=torch.long)
            for row, tokens in enumerate(rows):
                input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                mask[row, : len(tokens)] = 1
            with torch.inference_mode():
                input_ids, mask = input_ids.to(self.device), mask.to(self.device)
                hidden = self._model(input_ids=input_ids, attention_mask=mask).last_hidden_state
                vectors = pool(hidden.float(), mask, self.pooling).cpu().numpy()
        except Exception as exc:  # fail these requests, keep serving the others
            log.error("embedder.batch_failed", model=self.model_name, error_type=type(exc).__name__)
            for job in {job for job, _ in batch}:
                job.cancelled = True  # its other inputs are not embedded for nothing
                self._settle(job, EngineFailure("the embedding engine failed on this batch"))
            self._release(len(batch))
            return
        self._batches += 1
        self._inputs += len(batch)
        self._release(len(batch))
        for (job, index), vector in zip(batch, vectors, strict=True):
            job.out[index] = vector
            job.done += 1
            if job.done == len(job.ids):
                counts = [len(tokens) for tokens in job.ids]
                self._settle(job, EmbeddingResult(vectors=job.out, token_counts=counts))

    def _release(self, inputs: int) -> None:
        with self._cond:
            self._queued -= inputs

    def _settle(self, job: _Job, outcome: EmbeddingResult | BaseException) -> None:
        def settle() -> None:
            if job.future.done():
                return
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            job.loop.call_soon_threadsafe(settle)

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            jobs, self._incoming = [*self._active, *self._incoming], []
            self._active.clear()
            self._ready.clear()
        for job in jobs:
            self._settle(job, error)
