"""Next-token selection for a batch where every row has its own sampling parameters and random stream.

A row may carry a grammar (grammar.py): its logits are masked to the tokens the grammar allows before the
penalties and the draw, and the chosen token advances its grammar.  Greedy rows (temperature 0) take one
batched argmax; sampling rows each draw from their own seeded
`torch.Generator`, so a request's output depends on its seed and input, not on what else shares the batch.
The logits may be on the GPU: the argmax, penalties and logprobs run where they are and only token ids and
the chosen numbers cross to the host; a sampling row draws on the host (its generator is a CPU one), so a
seed means the same stream on every device.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from gateway.engine.base import SamplingParams
from gateway.engine.local.grammar import RowGrammar, apply_grammar_masks

__all__ = ["SampleResult", "SequenceSampler", "sample_batch"]


@dataclass
class SequenceSampler:
    """Per-sequence sampling state: parameters, random stream and tokens produced so far (for penalties)."""

    params: SamplingParams
    generator: torch.Generator = field(init=False)
    generated: list[int] = field(default_factory=list)
    grammar: RowGrammar | None = None  # constrained decoding: this row's grammar state

    def __post_init__(self) -> None:
        self.generator = torch.Generator()
        seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        self.generator.manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.params.temperature <= 0.0

    @property
    def penalised(self) -> bool:
        return bool(self.params.presence_penalty or self.params.frequency_penalty) and bool(self.generated)


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None  # chosen-token logprob per row, when any row asked for logprobs
    top: list[list[tuple[int, float]]] | None


def sample_batch(logits: torch.Tensor, samplers: list[SequenceSampler]) -> SampleResult:
    """logits: [rows, vocab] fp32, one row per sampler."""
    raw = logits
    grammars = [s.grammar for s in samplers]
    if any(g is not None for g in grammars):
        wants_raw = any(s.params.logprobs for s in samplers)
        logits = apply_grammar_masks(logits.clone() if wants_raw else logits, grammars)
    logits = _apply_penalties(logits, samplers)
    device = logits.device
    chosen = torch.empty(len(samplers), dtype=torch.long)
    greedy_rows = [i for i, s in enumerate(samplers) if s.greedy]
    if len(greedy_rows) == len(samplers):
        chosen = logits.argmax(dim=-1).cpu()
    elif greedy_rows:
        index = torch.tensor(greedy_rows)
        chosen[index] = logits[index.to(device)].argmax(dim=-1).cpu()
    for row, sampler in enumerate(samplers):
        if not sampler.greedy:
            chosen[row] = _draw(logits[row].cpu(), sampler)
    token_ids = chosen.tolist()
    for sampler, token in zip(samplers, token_ids, strict=True):
        sampler.generated.append(token)
        if sampler.grammar is not None and not sampler.grammar.done:
            sampler.grammar.accept(token)

    if not any(s.params.logprobs for s in samplers):
        return SampleResult(token_ids, None, None)
    log_probs = torch.log_softmax(raw, dim=-1)
    picked = log_probs.gather(1, chosen.to(device).unsqueeze(1)).squeeze(1).tolist()
    k = max(s.params.top_logprobs for s in samplers)
    top: list[list[tuple[int, float]]] = [[] for _ in samplers]
    if k:
        values, indices = log_probs.topk(k, dim=-1)
        for row, sampler in enumerate(samplers):
            n = sampler.params.top_logprobs
            top[row] = list(zip(indices[row, :n].tolist(), values[row, :n].tolist(), strict=True))
    return SampleResult(token_ids, picked, top)


def _apply_penalties(logits: torch.Tensor, samplers: list[SequenceSampler]) -> torch.Tensor:
    rows = [i for i, s in enumerate(samplers) if s.penalised]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for row in rows:
        sampler = samplers[row]
        generated = torch.tensor(sampler.generated, device=logits.device)
        counts = torch.bincount(generated, minlength=vocab)[:vocab].to(logits.dtype)
        logits[row] -= sampler.params.frequency_penalty * counts
        logits[row] -= sampler.params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _draw(logits: torch.Tensor, sampler: SequenceSampler) -> torch.Tensor:
    probs = torch.softmax(logits / sampler.params.temperature, dim=-1)
    top_p = sampler.params.top_p
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=sampler.generator)[0]
