"""Packing tokenized examples into micro-batches: one row each, no padding, a shared prompt prefix laid once.

`pack` lays several examples end to end in one row with positions restarting for each, so no compute is
spent on padding, none on a prompt prefix the examples share, and none on tokens after an example's last
learned one.  `Batch` is the contract with the trainer's forward pass (finetune.packed), whose attention
keeps every example to itself.  Kept apart from tokenizing: it works on token ids only, and its order is
seeded so a resumed run sees the same batches.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from finetune.chat_template import IGNORE_INDEX, Example

__all__ = ["Batch", "pack"]


@dataclass(frozen=True)
class Batch:
    """Examples laid end to end in one row: no padding, positions restarting for each example.

    Two cuts save compute without changing the loss or its gradients.  Each example stops at the input that
    predicts its last learned token: later tokens cannot reach the loss through causal attention.  And when
    the examples open with the same prompt tokens (a system prompt, an Alpaca instruction), that prefix is
    laid down once as segment 0 (`shared_prefix` tokens) and every example continues from it; the trainer's
    attention lets each example see the prefix and itself, and nothing else.
    """

    input_ids: list[int]
    targets: list[int]  # the token each position must predict (the next one), or IGNORE_INDEX
    position_ids: list[int]
    boundaries: list[int]  # segment k spans [boundaries[k], boundaries[k + 1])
    shared_prefix: int  # length of segment 0 when it is a prefix the other segments share, else 0
    example_tokens: int  # the examples' own lengths summed: the tokens this batch trains on

    @property
    def examples(self) -> int:
        return len(self.boundaries) - 1 - (self.shared_prefix > 0)

    @property
    def tokens(self) -> int:
        """Tokens the model computes on: example_tokens less the shared prefix repeats and cut tails."""
        return len(self.input_ids)

    @property
    def trainable_tokens(self) -> int:
        return sum(target != IGNORE_INDEX for target in self.targets)


def pack(
    examples: Sequence[Example],
    max_tokens_per_batch: int,
    seed: int,
    *,
    max_examples_per_batch: int | None = None,
    share_prefix: bool = True,
) -> list[Batch]:
    """Shuffle with `seed`, then fill batches in that order up to the token and example limits.

    Examples without a learned token (tokenize never returns any) are skipped: they add nothing to the loss.
    """
    examples = [example for example in examples if example.trainable_tokens]
    longest = max((len(example.input_ids) for example in examples), default=0)
    if longest > max_tokens_per_batch:
        raise ValueError(
            f"max_tokens_per_batch={max_tokens_per_batch} is below the longest example ({longest})"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)  # noqa: S311 - a reproducible data order, not a secret
    groups: list[list[Example]] = []
    tokens = 0
    for index in order:
        example = examples[index]
        full = groups and max_examples_per_batch is not None and len(groups[-1]) >= max_examples_per_batch
        if not groups or full or tokens + len(example.input_ids) > max_tokens_per_batch:
            groups.append([])
            tokens = 0
        groups[-1].append(example)
        tokens += len(example.input_ids)
    return [_concatenate(group, share_prefix=share_prefix) for group in groups]


def _concatenate(group: list[Example], *, share_prefix: bool) -> Batch:
    learned = [[t for t, label in enumerate(e.labels) if t and label != IGNORE_INDEX] for e in group]
    # Position t predicts label t + 1: the prefix may run up to just before the first learned label.
    prefix = _common_prefix([e.input_ids for e in group]) if share_prefix and len(group) > 1 else 0
    prefix = min([prefix, *(positions[0] - 1 for positions in learned)])
    input_ids, targets = group[0].input_ids[:prefix], [IGNORE_INDEX] * prefix
    position_ids, boundaries = list(range(prefix)), [0, prefix] if prefix else [0]
    for example, positions in zip(group, learned, strict=True):
        end = positions[-1]  # the input at end - 1 predicts the last learned token; later ones feed nothing
        input_ids += example.input_ids[prefix:end]
        targets += example.labels[prefix + 1 : end + 1]
        position_ids += range(prefix, end)
        boundaries.append(len(input_ids))
    example_tokens = sum(len(example.input_ids) for example in group)
    return Batch(input_ids, targets, position_ids, boundaries, prefix, example_tokens)


def _common_prefix(sequences: list[list[int]]) -> int:
    length = 0
    for column in zip(*sequences, strict=False):
        if any(token != column[0] for token in column):
            break
        length += 1
    return length
