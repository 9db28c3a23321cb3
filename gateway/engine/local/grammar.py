"""Constrained decoding: a grammar per batch row, applied as a token bitmask to that row's logits.

    Grammar (engine/base.py)  --compile, off the engine thread, cached by hash-->  CompiledGrammar
    CompiledGrammar --one matcher per sequence-->  RowGrammar: mask(row) before sampling, accept(token) after

Library: xgrammar (measured against llguidance on the default model's tokenizer; README, "Library choices").
Its compiled grammar is immutable and shared; each sequence holds its own `GrammarMatcher`, touched only on
the engine thread.  JSON is compact (no free whitespace between tokens), so a small model cannot stall in
whitespace; strings may still run long, and the token budget then ends the row with finish_reason "length".
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any

import torch

from gateway.core.errors import InvalidRequest
from gateway.engine.base import Grammar

__all__ = ["GrammarCompiler", "RowGrammar", "apply_grammar_masks", "unsupported_keyword"]

CACHE_SIZE = 256
# JSON Schema keywords xgrammar would silently ignore: a schema that needs them cannot be enforced.
UNSUPPORTED_KEYWORDS = frozenset(
    {"not", "if", "then", "else", "dependentRequired", "dependentSchemas", "unevaluatedProperties",
     "unevaluatedItems", "contains", "propertyNames"}
)  # fmt: skip


def unsupported_keyword(schema: Any, path: str = "#") -> str | None:
    """The first place in `schema` that uses a keyword this engine cannot enforce, or None."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in UNSUPPORTED_KEYWORDS:
                return f"{path}/{key}"
            if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(value, dict):
                for name, sub in value.items():
                    found = unsupported_keyword(sub, f"{path}/{key}/{name}")
                    if found:
                        return found
            elif key not in ("enum", "const", "default", "examples"):
                found = unsupported_keyword(value, f"{path}/{key}")
                if found:
                    return found
    elif isinstance(schema, list):
        for i, item in enumerate(schema):
            found = unsupported_keyword(item, f"{path}/{i}")
            if found:
                return found
    return None


class GrammarCompiler:
    """Compiles grammars for one tokenizer; thread-safe; an LRU cache keyed by the grammar's hash."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int]) -> None:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids) or None
        )
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.vocab_size = vocab_size
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # cache misses, for tests and benchmarks

    @staticmethod
    def key(grammar: Grammar) -> str:
        return hashlib.sha256(f"{grammar.kind}\0{grammar.schema}".encode()).hexdigest()

    async def compile_async(self, grammar: Grammar) -> Any:
        """Compile off the event loop and off the engine thread (a worker thread of the loop)."""
        key = self.key(grammar)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        return await asyncio.to_thread(self.compile, grammar)

    def compile(self, grammar: Grammar) -> Any:
        key = self.key(grammar)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        schema = '{"type": "object"}' if grammar.kind == "json_object" else grammar.schema
        try:
            parsed = json.loads(schema)
        except ValueError:
            raise InvalidRequest("the JSON schema is not valid JSON", param="response_format") from None
        where = unsupported_keyword(parsed)
        if where is not None:
            raise InvalidRequest(
                f"the JSON schema uses a keyword this server cannot enforce ({where})",
                param="response_format",
            )
        try:
            compiled = self._compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=True)
        except Exception as exc:  # the library's own words name the problem, never any content of ours
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            reason = reason.split("] ", 1)[-1].split(": ", 1)[-1][:200]
            raise InvalidRequest(
                f"the JSON schema is not supported: {reason}", param="response_format"
            ) from None
        with self._lock:
            self.compiled += 1
            self._cache[key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled


class RowGrammar:
    """One sequence's grammar state.  `done` once the text is complete or the grammar was left."""

    def __init__(self, compiled: Any) -> None:
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled)
        self.done = False
        self.failed = False

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> None:
        if not self._matcher.accept_token(token):
            self.failed = self.done = True
        elif self._matcher.is_completed() or self._matcher.is_terminated():
            self.done = True


def apply_grammar_masks(logits: torch.Tensor, grammars: list[RowGrammar | None]) -> torch.Tensor:
    """Mask, in place, the tokens each constrained row may not take next; free rows are untouched."""
    rows = [i for i, g in enumerate(grammars) if g is not None and not g.done]
    if not rows:
        return logits
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(grammars), logits.shape[-1])
    for row in rows:
        grammar = grammars[row]
        assert grammar is not None
        grammar.fill(bitmask, row)
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
    return logits
