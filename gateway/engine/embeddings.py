"""The embedding engine boundary: inputs in, one vector per input out.  No torch here.

A request hands the engine its inputs as they came (strings, or the model's own token ids); the engine
tokenizes off the event loop, checks every input (empty, too long, ids outside the vocabulary: an
InvalidRequest naming the input's index), queues them, and the engine thread embeds them in batches shared
with other requests.  What comes back is float32, one row per input, already pooled (and normalized where the
model's configuration says so), with the tokens each input counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["EmbeddingEngine", "EmbeddingInputs", "EmbeddingResult", "EmbeddingStats"]

EmbeddingInputs = list[str] | list[list[int]]


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: npt.NDArray[np.float32]  # (inputs, dimensions), row i for input i
    token_counts: list[int]  # tokens the model read for each input (special tokens included)

    @property
    def prompt_tokens(self) -> int:
        return sum(self.token_counts)


@dataclass(frozen=True)
class EmbeddingStats:
    queued: int  # inputs waiting
    batches: int  # forward passes run
    inputs: int  # inputs embedded


class EmbeddingEngine(Protocol):
    model_name: str
    dimensions: int  # the length of one vector
    max_input_tokens: int  # the longest input, special tokens included
    normalized: bool  # vectors have unit length (so truncating them needs renormalizing)

    async def embed(self, inputs: EmbeddingInputs) -> EmbeddingResult:
        """Validate, tokenize, queue and wait.  Raises InvalidRequest (param "input", the index named),
        RateLimited (queue full), EngineUnavailable (stopped or not started)."""
        ...

    def stats(self) -> EmbeddingStats: ...

    def is_ready(self) -> bool: ...

    def start(self) -> None: ...

    def shutdown(self) -> None: ...
