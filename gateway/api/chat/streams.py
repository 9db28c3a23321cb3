"""Several engine streams read as one: a legacy completion request with a list of prompts.

OpenAI numbers the choices of a multi-prompt request prompt by prompt: choice `i * n + j` is the j-th of the n
completions of prompt i.  Each prompt is its own engine request (so they batch together in the engine); this
stream interleaves their deltas as they come, renumbered, and closing it aborts whatever still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence

from gateway.engine.base import ChoiceDelta, GenerationStream

__all__ = ["MergedStream"]

_DONE = object()


class MergedStream:
    def __init__(self, streams: Sequence[GenerationStream], n: int) -> None:
        self._streams = list(streams)
        self._n = n
        self.prompt_tokens = sum(s.prompt_tokens for s in streams)

    async def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        queue: asyncio.Queue[object] = asyncio.Queue()

        async def pump(offset: int, stream: GenerationStream) -> None:
            try:
                async for delta in stream:
                    await queue.put(dataclasses.replace(delta, index=offset + delta.index))
            except Exception as exc:  # handed to the reader, which raises it
                await queue.put(exc)
            finally:
                await queue.put(_DONE)

        tasks = [asyncio.create_task(pump(i * self._n, s)) for i, s in enumerate(self._streams)]
        try:
            running = len(tasks)
            while running:
                item = await queue.get()
                if item is _DONE:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    assert isinstance(item, ChoiceDelta)
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def aclose(self) -> None:
        for stream in self._streams:
            await stream.aclose()
