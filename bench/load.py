"""The serving benchmarks' one load generator: exactly `concurrency` streaming chat requests in flight.

Each of `concurrency` clients sends `rounds` requests one after another, every one streaming `tokens` new
tokens (`ignore_eos`, greedy) over the same prompts; a client's model rotates over `models` (the base model,
or several fine-tuned adapters for mixed traffic).  Measured: aggregate completion tokens per second over the
whole burst (the server's own `usage` counts) and each request's time to its first content chunk.  One
warm-up request per model runs first (connections, first-step allocations, adapter loading).  Used by
bench_serving.py, bench_vllm_overhead.py and bench_vs_vllm.py, so all of them load a server the same way.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

__all__ = ["PROMPTS", "Burst", "client_limits", "percentile", "streams"]

PROMPTS = [
    "Explain how a bank assesses the credit risk of a small business.",
    "Write a short story about a lighthouse keeper.",
    "What are the benefits of regular exercise?",
    "Describe the water cycle to a ten year old.",
]


@dataclass(frozen=True)
class Burst:
    tokens_per_second: float
    ttfts: list[float]  # seconds, one per request

    @property
    def ttft_p50(self) -> float:
        return statistics.median(self.ttfts)

    @property
    def ttft_p95(self) -> float:
        return percentile(self.ttfts, 0.95)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _one(http: httpx.AsyncClient, path: str, body: dict[str, object]) -> tuple[int, float]:
    """(completion tokens, seconds to the first content chunk) of one streamed request."""
    start = time.perf_counter()
    first = float("nan")
    produced = 0
    async with http.stream("POST", path, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if first != first and '"content":"' in line and '"content":""' not in line:  # nan: none yet
                first = time.perf_counter() - start
            if '"usage":{' in line and line.startswith("data: "):
                usage = json.loads(line[len("data: ") :]).get("usage") or {}
                produced += int(usage.get("completion_tokens") or 0)
    return produced, first


async def streams(
    http: httpx.AsyncClient,
    *,
    concurrency: int,
    tokens: int,
    rounds: int,
    models: Sequence[str],
    path: str = "/v1/chat/completions",
    warm_up: bool = True,
) -> Burst:
    """Run one burst (see the module docstring) against the server behind `http`."""

    def body(model: str, prompt: str) -> dict[str, object]:
        return {
            "model": model,
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": prompt}],
        }

    if warm_up:
        for model in models:
            await _one(http, path, body(model, PROMPTS[0]))
    produced = 0
    ttfts: list[float] = []

    async def client(index: int) -> None:
        nonlocal produced
        for r in range(rounds):
            model = models[(index + r) % len(models)]
            count, first = await _one(http, path, body(model, PROMPTS[(index + r) % len(PROMPTS)]))
            produced += count
            ttfts.append(first)

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return Burst(produced / (time.perf_counter() - start), ttfts)


def client_limits(concurrency: int) -> httpx.Limits:
    return httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
