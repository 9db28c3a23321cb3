"""A deterministic stand-in for the local engine, for app-level unit tests (no torch, no model).

It answers every request with the same short text, counts prompt tokens as whitespace-separated words, and
records what it was given so a test can check that a canary reached the engine (and nothing else).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from gateway.engine.base import ChoiceDelta, EngineStats, GenerationRequest

__all__ = ["FakeEngine", "FakeStream"]


class FakeStream:
    def __init__(self, request: GenerationRequest, reply: str) -> None:
        text = " ".join(m.content for m in request.messages or ()) or (request.prompt or "")
        self.prompt_tokens = max(1, len(text.split()))
        self._request = request
        self._reply = reply
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        for index in range(self._request.n):
            for word in self._reply.split(" "):
                yield ChoiceDelta(index=index, text=word + " ", token_count=1)
            yield ChoiceDelta(index=index, text="", token_count=1, finish_reason="stop")

    async def aclose(self) -> None:
        self.closed = True


class FakeEngine:
    def __init__(self, model_name: str = "smollm2-135m-instruct", reply: str = "fake reply") -> None:
        self.model_name = model_name
        self.max_model_len = 2048
        self.reply = reply
        self.requests: list[GenerationRequest] = []
        self._adapters: dict[str, Path] = {}

    async def submit(self, request: GenerationRequest) -> FakeStream:
        self.requests.append(request)
        return FakeStream(request, self.reply)

    def add_adapter(self, name: str, path: Path) -> None:
        self._adapters[name] = path

    def remove_adapter(self, name: str) -> None:
        self._adapters.pop(name, None)

    def has_adapter(self, name: str) -> bool:
        return name in self._adapters

    def stats(self) -> EngineStats:
        return EngineStats(running=0, queued=0, adapters=len(self._adapters), max_running=4, max_queued=8)

    def is_ready(self) -> bool:
        return True

    def is_failed(self) -> bool:
        return False

    def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass
