"""The engine thread: continuous batching over one ModelRunner.

It loops: take commands (new requests, aborts) -> admit waiting requests into free KV slots -> run one step (a
decode token for every running sequence plus prompt chunks of newly admitted ones) -> sample -> detokenize ->
push deltas to each request's asyncio queue.  A request joins the running batch at the next step, and one that
finishes or is aborted frees its slot at once; slots are kept dense by moving the last one into the hole.
Only this thread touches the runner and the sequences; other threads talk to it through `commands` (add,
abort, stop, and `call`: run a function here, as LocalEngine does to load adapters).

Every tensor the engine owns (weights, KV cache, adapters) is created and mutated on this thread under
`torch.inference_mode()`: a tensor made in inference mode cannot be updated in place outside it, and a KV
cache that grew inside a step but was compacted outside it once took the engine down for good.

Failures: a step that raises fails the requests that were running (a 500 naming no internals) and drops the
running batch; waiting requests stay queued and the engine goes on.  Recovery cannot raise.  After
MAX_FAILED_STEPS failures in a row `run()` returns False: the runner is suspect and LocalEngine rebuilds it
on this same thread, keeping the queues, so no request accepted meanwhile is lost.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch

from gateway.core.errors import EngineFailure, EngineUnavailable, GatewayError
from gateway.engine.base import ChoiceDelta, FinishReason, TokenLogprob
from gateway.engine.local.detokenizer import IncrementalDetokenizer, StopMatcher
from gateway.engine.local.lora import LoraAdapter
from gateway.engine.local.runner import ModelRunner, PrefillSegment, StepBatch
from gateway.engine.local.sampling import SequenceSampler, sample_batch

__all__ = ["MAX_FAILED_STEPS", "Group", "Scheduler", "Sequence"]

log = structlog.get_logger(__name__)

MAX_FAILED_STEPS = 3  # failed steps in a row before the runner is rebuilt
STEP_FAILED = "the engine failed while generating; the request was aborted"


@dataclass
class Sequence:
    group: Group
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
class Group:
    """One request: n sequences sharing a prompt, one asyncio queue back to the caller."""

    request_id: str
    prompt: list[int]
    max_tokens: int
    adapter: LoraAdapter | None
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[list[ChoiceDelta] | BaseException]
    sequences: list[Sequence] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens already in the cache of the first sequence
    aborted: bool = False

    def send(self, item: list[ChoiceDelta] | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the caller's loop is gone; nothing left to tell
            self.aborted = True


class Scheduler:
    """Owns the runner, the waiting queue and the running batch; `run()` is the engine thread's body."""

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Any,
        stop_ids: set[int],
        *,
        max_running: int,
        prefill_token_budget: int,
    ) -> None:
        self.runner: ModelRunner | None = runner  # None only while LocalEngine rebuilds it
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.max_running = max_running
        self.prefill_token_budget = prefill_token_budget  # prompt tokens one step may prefill
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._waiting: deque[Group] = deque()
        self._running: list[Sequence] = []  # index == slot
        self._groups: dict[str, Group] = {}
        self.queued = 0  # submitted, not yet admitted (the engine's back-pressure count)
        self._queued_lock = threading.Lock()
        self._closed = False  # set under _queued_lock once nothing will drain the commands any more
        self.failed_steps = 0  # since start, for metrics
        self._failures_in_a_row = 0

    @property
    def running(self) -> int:
        return len(self._running)

    def enqueue(self, group: Group, *, max_queued: int) -> bool:
        """Queue a request for the thread; False when `max_queued` requests are waiting already."""
        with self._queued_lock:
            if self._closed:
                raise EngineUnavailable("the engine is not running; retry shortly")
            if self.queued >= max_queued:
                return False
            self.queued += 1
            self._commands.put(("add", group))  # under the lock: close() drains whatever got in before it
        return True

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stop(self) -> None:
        self._commands.put(("stop", None))

    def call(self, fn: Callable[[], Any], result: Future[Any]) -> None:
        """Run `fn` on the engine thread between two steps; its value or exception lands in `result`."""
        self._commands.put(("call", (fn, result)))

    def run(self) -> bool:
        """The engine thread's loop.  True when told to stop; False when steps keep failing and the runner
        must be rebuilt (the queues are kept: call `run()` again with a new `runner`)."""
        self._failures_in_a_row = 0
        with torch.inference_mode():
            while True:
                try:
                    idle = not self._running and not self._waiting
                    if not self._drain(block=idle):
                        return True
                    self._admit()
                    if self._running:
                        self._step()
                        self._failures_in_a_row = 0
                except Exception as exc:  # keep serving: fail what was running, drop it, go on
                    self.failed_steps += 1
                    self._failures_in_a_row += 1
                    log.error(
                        "engine.step_failed", error_type=type(exc).__name__, in_a_row=self._failures_in_a_row
                    )
                    self._fail_running(EngineFailure(STEP_FAILED))
                    if self._failures_in_a_row >= MAX_FAILED_STEPS:
                        return False

    def _drain(self, *, block: bool) -> bool:
        while True:
            try:
                kind, payload = self._commands.get(block=block, timeout=None)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                self.close(EngineUnavailable("the engine is shutting down"))
                return False
            if kind == "add":
                self._waiting.append(payload)
                self._groups[payload.request_id] = payload
            elif kind == "abort":
                group = self._groups.get(payload)
                if group is not None:
                    group.aborted = True
                    self._finish_group(group)
            elif kind == "call":
                fn, result = payload
                try:
                    result.set_result(fn())
                except Exception as exc:
                    result.set_exception(exc)

    def _admit(self) -> None:
        while self._waiting:
            group = self._waiting[0]
            if not group.aborted and len(self._running) + len(group.sequences) > self.max_running:
                return
            self._waiting.popleft()
            with self._queued_lock:
                self.queued -= 1
            if group.aborted:
                continue
            for seq in group.sequences:
                seq.slot = len(self._running)
                self._running.append(seq)

    def _step(self) -> None:
        assert self.runner is not None
        batch = StepBatch()
        decoding: list[Sequence] = []
        prefilling: list[Group] = []
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
        logits = self.runner.step(batch)

        rows: list[Sequence] = list(decoding)
        row_logits = [logits[: len(decoding)]]
        cursor = len(decoding)
        for seg, group in zip(batch.prefills, prefilling, strict=True):
            group.prefilled += len(seg.token_ids)
            first = group.sequences[0]
            first.length = group.prefilled
            if not seg.wants_logits:
                continue
            for sibling in group.sequences[1:]:  # n > 1: share the prompt's cache instead of recomputing it
                self.runner.move_slot(first.slot, sibling.slot, first.length)
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

    def _advance(self, seq: Sequence, token: int, result: Any, row: int) -> ChoiceDelta | None:
        seq.generated += 1
        finish: FinishReason | None = None
        if token in self.stop_ids and not seq.sampler.params.ignore_eos:
            text, finish = seq.stops.flush(), "stop"
        else:
            text, hit = seq.stops.feed(seq.detok.push(token))
            grammar = seq.sampler.grammar
            if hit or (grammar is not None and grammar.done):  # a constrained row ends with its grammar
                text, finish = (text if hit else text + seq.stops.flush()), "stop"
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

    def _finish_group(self, group: Group) -> None:
        self._groups.pop(group.request_id, None)
        for seq in group.sequences:
            seq.done = True
            if seq.slot >= 0:
                self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Free a slot, moving the last running sequence into it so slots stay dense."""
        assert self.runner is not None
        hole = seq.slot
        seq.slot = -1
        last = self._running.pop()
        if last is not seq:
            self.runner.move_slot(last.slot, hole, last.length)
            last.slot = hole
            self._running[hole] = last

    def _fail_running(self, error: GatewayError) -> None:
        """Fail every running request and empty the batch without touching the runner (its state is
        suspect after a failed step; the freed slots are simply reused).  Never raises."""
        failed = {id(seq.group): seq.group for seq in self._running}
        self._running = []
        for group in failed.values():
            for seq in group.sequences:
                seq.done, seq.slot = True, -1
            self._groups.pop(group.request_id, None)
            _send_quietly(group, error)

    def close(self, error: GatewayError) -> None:
        """Fail everything held or still in the command queue and refuse new requests (shutdown, or an
        engine that could not be rebuilt).  Never raises."""
        with self._queued_lock:
            self._closed = True
        self._fail_running(error)
        pending = list(self._waiting)
        self._waiting.clear()
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                pending.append(payload)
            elif kind == "call":
                payload[1].set_exception(EngineUnavailable("the engine stopped"))
        for group in pending:
            self._groups.pop(group.request_id, None)
            _send_quietly(group, error)
        self._groups.clear()
        with self._queued_lock:
            self.queued = 0


def _send_quietly(group: Group, error: GatewayError) -> None:
    try:
        group.send(error)
    except Exception as exc:  # recovery must not raise; the caller's loop is gone or closing
        log.warning("engine.notify_failed", error_type=type(exc).__name__)
