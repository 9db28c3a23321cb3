"""Conversations -> token ids with the tokenizer's chat template, and the assistant-only loss labels.

Tokens are labelled for the loss only on trainable assistant turns, their end-of-turn token included so the
model learns to stop.  Each turn's span is found by rendering the conversation up to it, so any template
that renders turn by turn consistently works; one that refuses a conversation (or renders it otherwise)
drops that example with a count in the log, never its content.

Kept apart from reading the upload (contracts.training_data): this is the part that needs a tokenizer, and
it is the contract the trainer's loss relies on (IGNORE_INDEX).  It does not import torch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jinja2 import TemplateError

from contracts.training_formats import Conversation

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["IGNORE_INDEX", "Example", "tokenize"]

IGNORE_INDEX = -100  # label of a token the loss skips (the convention of torch's cross_entropy)

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One tokenized conversation; labels[i] is input_ids[i] where the loss learns it, else IGNORE_INDEX."""

    input_ids: list[int]
    labels: list[int]

    @property
    def trainable_tokens(self) -> int:
        # labels[0] can never be predicted: nothing comes before it.
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


class _TemplateMismatch(Exception):
    """The template refuses the conversation, or rendering it turn by turn is no prefix of the whole."""


def tokenize(
    conversations: Iterable[Conversation], tokenizer: PreTrainedTokenizerBase, max_seq_length: int
) -> list[Example]:
    """Tokenize with the tokenizer's chat template; truncate; drop examples left with nothing to learn."""
    examples: list[Example] = []
    empty = refused = 0
    for conversation in conversations:
        try:
            example = _tokenize_one(conversation, tokenizer)
        except _TemplateMismatch:
            refused += 1
            continue
        example = Example(example.input_ids[:max_seq_length], example.labels[:max_seq_length])
        if example.trainable_tokens == 0:
            empty += 1
            continue
        examples.append(example)
    if empty or refused:
        _log.warning(
            "dropped %d conversations with nothing to learn within max_seq_length=%d and %d that the chat "
            "template refuses or renders inconsistently turn by turn",
            empty,
            max_seq_length,
            refused,
        )
    return examples


def _tokenize_one(conversation: Conversation, tokenizer: PreTrainedTokenizerBase) -> Example:
    messages = [{"role": turn.role, "content": turn.text} for turn in conversation]
    input_ids = _render(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE_INDEX] * len(input_ids)
    for i, turn in enumerate(conversation):
        # An opening assistant turn (a greeting) is context only: there is nothing before it to render.
        if not turn.trainable or i == 0:
            continue
        # The reply is what rendering through this turn adds to rendering up to its generation prompt.
        start = _prefix_length(input_ids, _render(tokenizer, messages[:i], generation_prompt=True))
        end = _prefix_length(input_ids, _render(tokenizer, messages[: i + 1], generation_prompt=False))
        end = _without_trailing_space(tokenizer, input_ids, start, end)
        labels[start:end] = input_ids[start:end]
    labels[0] = IGNORE_INDEX
    return Example(input_ids, labels)


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, generation_prompt: bool
) -> list[int]:
    if not messages and not generation_prompt:
        return []
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except TemplateError:  # a template may refuse a role or an order (e.g. "roles must alternate")
        raise _TemplateMismatch from None
    assert isinstance(text, str)
    # The template writes any BOS itself; letting the tokenizer add another would double it.
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def _prefix_length(full: Sequence[int], prefix: Sequence[int]) -> int:
    if list(full[: len(prefix)]) != list(prefix):
        raise _TemplateMismatch
    return len(prefix)


def _without_trailing_space(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], start: int, end: int
) -> int:
    """Leave the newline a template writes after the end-of-turn token out of the loss: it is formatting."""
    special = set(tokenizer.all_special_ids)
    while end > start and ids[end - 1] not in special and not str(tokenizer.decode([ids[end - 1]])).strip():
        end -= 1
    return end
