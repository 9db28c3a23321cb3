"""Structured output: what constrained decoding costs the engine, and what compiling a grammar takes.

    .venv/bin/python bench/bench_structured.py [--clients 8] [--rounds 2] [--write]

Throughput: `--clients` requests at once on the in-process LocalEngine over the default model, each asking
for a json_schema (greedy; a different person per client).  Baseline, in the same run and the same engine:
the same prompts unconstrained, each decoding exactly as many tokens as its constrained twin did
(`ignore_eos`), so both sides do the same number of steps of the same batch size; the ratio is the mask's
cost (fill the bitmask per row, apply it, advance the matcher).  Compile: each test schema compiled with a
cold cache, `--repeat` times; p50 and max.  With --write the table replaces this benchmark's section in
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec
from pydantic import BaseModel, Field

from bench.results import cpu_name, write_section
from contracts.base_models import embedded_gguf, prepare
from gateway.api.chat import protocol as p
from gateway.api.chat.structured import plan_for
from gateway.engine.base import ChatMessage, GenerationRequest, Grammar, SamplingParams
from gateway.engine.local.engine import LocalEngine

MODEL = "smollm2-135m-instruct"
NAMES = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Niklaus", "Margaret"]


class Address(BaseModel):
    street: str = Field(max_length=30)
    city: str = Field(max_length=20)


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int
    nickname: str | None = Field(max_length=12)
    hobbies: list[str] = Field(min_length=1, max_length=3)
    address: Address


class Step(BaseModel):
    explanation: str
    output: str


class MathAnswer(BaseModel):
    steps: list[Step]
    final_answer: str


def _strict(model: type[BaseModel]) -> str:
    from openai.lib._pydantic import to_strict_json_schema

    return json.dumps(to_strict_json_schema(model))


def bench_grammars() -> dict[str, Grammar]:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"],
            },
        },
    }
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "x"}],
        "tools": [tool],
        "tool_choice": "required",
    }
    plan = plan_for(msgspec.json.decode(json.dumps(body).encode(), type=p.ChatCompletionRequest))
    assert plan.grammar is not None
    return {
        "Person (nested, optional, list)": Grammar("json_schema", _strict(Person)),
        "MathAnswer (list of objects)": Grammar("json_schema", _strict(MathAnswer)),
        "tool_choice required (1 tool)": plan.grammar,
        "json_object": Grammar("json_object"),
    }


def _request(i: int, grammar: Grammar | None, max_tokens: int, ignore_eos: bool = False) -> GenerationRequest:
    text = f"Describe a person called {NAMES[i % len(NAMES)]} as JSON."
    return GenerationRequest(
        request_id=f"b{i}",
        model=MODEL,
        messages=(ChatMessage("user", text),),
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos),
        grammar=grammar,
    )


async def _run(engine: LocalEngine, requests: list[GenerationRequest]) -> tuple[float, list[int], list[str]]:
    async def one(req: GenerationRequest) -> tuple[int, str]:
        stream = await engine.submit(req)
        tokens, text = 0, ""
        async for delta in stream:
            tokens += delta.token_count
            text += delta.text
        return tokens, text

    start = time.perf_counter()
    done = await asyncio.gather(*(one(r) for r in requests))
    return time.perf_counter() - start, [t for t, _ in done], [s for _, s in done]


def throughput(engine: LocalEngine, clients: int, rounds: int) -> dict[str, float]:
    grammar = Grammar("json_schema", _strict(Person))
    asyncio.run(_run(engine, [_request(0, grammar, 32)]))  # warm-up (and the compile, cached after)
    asyncio.run(_run(engine, [_request(i, None, 32, ignore_eos=True) for i in range(clients)]))
    con_time = free_time = 0.0
    con_tokens = free_tokens = valid = total = 0
    for r in range(rounds):
        seconds, counts, texts = asyncio.run(
            _run(engine, [_request(r * clients + i, grammar, 200) for i in range(clients)])
        )
        con_time, con_tokens = con_time + seconds, con_tokens + sum(counts)
        for text in texts:
            total += 1
            try:
                Person.model_validate_json(text)
                valid += 1
            except ValueError:
                pass
        seconds, free_counts, _ = asyncio.run(
            _run(
                engine, [_request(r * clients + i, None, counts[i], ignore_eos=True) for i in range(clients)]
            )
        )
        free_time, free_tokens = free_time + seconds, free_tokens + sum(free_counts)
    return {
        "constrained": con_tokens / con_time,
        "free": free_tokens / free_time,
        "tokens": con_tokens / (rounds * clients),
        "valid": valid / total,
    }


def compile_times(engine: LocalEngine, repeat: int) -> dict[str, tuple[float, float]]:
    compiler = engine.grammars
    assert compiler is not None
    out = {}
    for name, grammar in bench_grammars().items():
        times = []
        for _ in range(repeat):
            compiler._cache.clear()  # cold: what the first request with this schema pays
            start = time.perf_counter()
            compiler.compile(grammar)
            times.append((time.perf_counter() - start) * 1000)
        out[name] = (statistics.median(times), max(times))
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or prepare(MODEL, embedded_gguf(), Path(tmp))
        engine = LocalEngine(MODEL, model_dir, max_running=16)
        engine.start()
        try:
            tput = throughput(engine, args.clients, args.rounds)
            compiles = compile_times(engine, args.repeat)
        finally:
            engine.shutdown()
    ratio = tput["constrained"] / tput["free"]
    lines = [
        f"Model {MODEL} on the in-process engine, CPU {cpu_name()}; {args.clients} concurrent requests x "
        f"{args.rounds} rounds, greedy, a strict json_schema (nested object, optional, list) of "
        f"{tput['tokens']:.0f} tokens on average; {tput['valid']:.0%} of the outputs validate. Baseline: the "
        "same prompts unconstrained, each decoding as many tokens as its constrained twin, same run.",
        "",
        "| requests | unconstrained tok/s | json_schema tok/s | ratio |",
        "|---|---|---|---|",
        f"| {args.clients} concurrent | {tput['free']:.1f} | {tput['constrained']:.1f} | {ratio:.2f}x |",
        "",
        f"Grammar compile (xgrammar, cold cache, {args.repeat} runs each; a cached schema costs nothing):",
        "",
        "| schema | p50 ms | max ms |",
        "|---|---|---|",
        *[f"| {name} | {p50:.1f} | {worst:.1f} |" for name, (p50, worst) in compiles.items()],
    ]
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section("structured", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
