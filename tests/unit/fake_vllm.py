"""A fake vLLM OpenAI server for unit tests, as an httpx transport: /health, /v1/models, streaming chat and
completions in vLLM's wire format (continuous usage stats, int error codes), runtime LoRA load/unload.

It "generates" the words `w0 w1 ...`, one token each, up to max_tokens (default 4), ending with "length"
then, or "stop" when `stop_after` is set.  Every request body it got is kept in `requests`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

PROMPT_TOKENS = 7


@dataclass
class FakeVllm:
    model: str
    max_model_len: int = 2048
    healthy: bool = True
    adapters: dict[str, str] = field(default_factory=dict)  # name -> path
    requests: list[dict[str, Any]] = field(default_factory=list)
    admin: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    error: tuple[int, str] | None = None  # answer every generation request with this (status, message)
    stop_after: int | None = None
    down: bool = False  # refuse connections (the process is gone)
    dies_mid_stream: bool = False  # send the first chunks, then the connection breaks

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        if path == "/health":
            return httpx.Response(200 if self.healthy else 503)
        if path == "/v1/models":
            ids = [self.model, *self.adapters]
            data = [{"id": i, "object": "model", "max_model_len": self.max_model_len} for i in ids]
            return httpx.Response(200, json={"object": "list", "data": data})
        body = json.loads(request.content or b"{}")
        if path == "/v1/load_lora_adapter":
            self.admin.append((path, body))
            if body["lora_name"] in self.adapters:
                return _error(400, f"The lora adapter '{body['lora_name']}' has already been loaded.")
            self.adapters[body["lora_name"]] = body["lora_path"]
            return httpx.Response(200, text="Success")
        if path == "/v1/unload_lora_adapter":
            self.admin.append((path, body))
            if self.adapters.pop(body["lora_name"], None) is None:
                return _error(404, f"The lora adapter '{body['lora_name']}' cannot be found.")
            return httpx.Response(200, text="Success")
        if path in ("/v1/chat/completions", "/v1/completions"):
            self.requests.append(body)
            if self.error is not None:
                return _error(*self.error)
            if body["model"] != self.model and body["model"] not in self.adapters:
                return _error(404, f"The model `{body['model']}` does not exist.")
            sse = self._sse(body, chat=path.endswith("chat/completions"))
            if self.dies_mid_stream:
                return httpx.Response(200, stream=_Broken(sse[: len(sse) // 2]), headers=_SSE)
            return httpx.Response(200, content=sse, headers=_SSE)
        return _error(404, "Not Found")

    def _sse(self, body: dict[str, Any], *, chat: bool) -> bytes:
        n, limit = body.get("n", 1), body.get("max_tokens", 4)
        count = min(limit, self.stop_after) if self.stop_after is not None else limit
        finish = "stop" if self.stop_after is not None and self.stop_after < limit else "length"
        events: list[dict[str, Any]] = []
        for index in range(n):
            if chat:
                events.append(self._chunk([_chat(index, {"role": "assistant", "content": ""})], 0))
        for step in range(count):
            for index in range(n):
                done = step + 1  # vLLM's continuous usage: this choice's tokens so far
                word = f"w{step} " if step < count - 1 else f"w{step}"
                last = step == count - 1
                if chat:
                    choice = _chat(index, {"content": word}, finish if last else None)
                    if body.get("logprobs"):
                        top = [{"token": word, "logprob": -0.5, "bytes": list(word.encode())}]
                        choice["logprobs"] = {
                            "content": [{**top[0], "top_logprobs": top[: body["top_logprobs"]]}]
                        }
                else:
                    choice = {
                        "index": index,
                        "text": word,
                        "logprobs": None,
                        "finish_reason": finish if last else None,
                    }
                events.append(self._chunk([choice], done))
        events.append(self._chunk([], count * n))  # the closing total
        lines = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events]
        return b"".join(lines) + b"data: [DONE]\n\n"

    def _chunk(self, choices: list[dict[str, Any]], completion: int) -> dict[str, Any]:
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion}
        usage["total_tokens"] = PROMPT_TOKENS + completion
        return {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": self.model,
                "choices": choices, "usage": usage}  # fmt: skip


_SSE = {"content-type": "text/event-stream"}


class _Broken(httpx.SyncByteStream, httpx.AsyncByteStream):
    """Some bytes, then the connection breaks (the vLLM process was killed mid-stream)."""

    def __init__(self, head: bytes) -> None:
        self.head = head

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        raise httpx.ReadError("connection reset")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        raise httpx.ReadError("connection reset")


def _chat(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


def _error(status: int, message: str) -> httpx.Response:
    kind = "BadRequestError" if status == 400 else "NotFoundError" if status == 404 else "InternalServerError"
    return httpx.Response(
        status, json={"error": {"message": message, "type": kind, "param": None, "code": status}}
    )


class Fleet:
    """Several fake replicas behind one transport, routed by host (http://r0:8000, http://r1:8000, ...)."""

    def __init__(self, model: str, count: int) -> None:
        self.replicas = [FakeVllm(model) for _ in range(count)]
        self.urls = [f"http://r{i}:8000" for i in range(count)]

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(lambda request: self.replicas[int(request.url.host[1:])].handle(request))
