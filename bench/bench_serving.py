"""Serving throughput and time to first token: the gateway (continuous batching) vs sequential `generate`.

    .venv/bin/python bench/bench_serving.py [--tokens 96] [--concurrency 1 4 8 16] [--write]

Baseline, measured in the same run: Hugging Face `model.generate` on the same model, one request after
another (what a simple server does), greedy, exactly `--tokens` new tokens.  Its time to first token at
concurrency c is what the i-th queued request waits: i full generations plus its own prefill.
Gateway: the real HTTPS server in a subprocess; c clients stream at once, each `--tokens` tokens
(`ignore_eos`), and every client repeats `--rounds` times; a last row reruns one client with
`engine.quantization=none` (dense weights only) to show what the int4 decode copy adds.  With --write the table replaces this
benchmark's section in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import PROMPTS, client_limits, percentile, streams
from bench.results import write_section
from contracts.base_models import embedded_gguf, load_model, load_tokenizer, prepare
from tests.e2e.harness import Gateway, make_certs

MODEL = "smollm2-135m-instruct"


def baseline(model_dir: Path, tokens: int, dtype: str) -> tuple[float, float]:
    """(tokens/s of one generate call, seconds to first token) for sequential model.generate."""
    import torch

    model = load_model(model_dir, dtype=dtype)
    tokenizer = load_tokenizer(model_dir)
    runs, firsts = [], []
    with torch.inference_mode():
        for prompt in PROMPTS[:3]:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
            )["input_ids"]
            model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False)
            firsts.append(time.perf_counter() - start)
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            runs.append(tokens / (time.perf_counter() - start))
    return statistics.median(runs), statistics.median(firsts)


async def gateway_round(
    gateway: Gateway, token: str, concurrency: int, tokens: int, rounds: int
) -> tuple[float, list[float]]:
    """(aggregate completion tokens/s, every request's time to first token)."""
    async with httpx.AsyncClient(
        base_url=gateway.url,
        verify=gateway.verify(),
        timeout=600,
        limits=client_limits(concurrency),
        headers={"Authorization": f"Bearer {token}"},
    ) as http:
        burst = await streams(http, concurrency=concurrency, tokens=tokens, rounds=rounds, models=[MODEL])
    return burst.tokens_per_second, burst.ttfts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        root = Path(tmp)
        model_dir = prepare(MODEL, embedded_gguf(), root / "models")
        base_tps, base_first = baseline(model_dir, args.tokens, "float32")
        bf16_tps, _ = baseline(model_dir, args.tokens, "bfloat16")
        make_certs(root / "certs")
        rows = []
        single = None
        for quantization in ("auto", "none"):  # the shipped default, then dense weights for one stream
            gateway = Gateway(
                data_dir=root / f"data-{quantization}",
                certs=root / "certs",
                model_dir=model_dir,
                extra_env={
                    "GATEWAY_LIMITS__REQUESTS_PER_MINUTE": "100000",
                    "GATEWAY_ENGINE__QUANTIZATION": quantization,
                },
            )
            gateway.start("--no-worker")
            try:
                token = gateway.token()
                for c in args.concurrency if quantization == "auto" else [1]:
                    tps, ttfts = asyncio.run(gateway_round(gateway, token, c, args.tokens, args.rounds))
                    single = single or tps
                    per_request = args.tokens / base_tps
                    base_ttft = [i * per_request + base_first for i in range(c)]
                    label = str(c) if quantization == "auto" else f"{c}, dense bf16 weights"
                    rows.append(
                        f"| {label} | {base_tps:.1f} | {tps:.1f} | {tps / base_tps:.2f}x | {tps / single:.2f}x | "
                        f"{statistics.median(base_ttft):.2f} / {percentile(base_ttft, 0.95):.2f} | "
                        f"{statistics.median(ttfts):.3f} / {percentile(ttfts, 0.95):.3f} |"
                    )
            finally:
                gateway.stop()

    table = "\n".join(
        [
            f"Model {MODEL}, {args.tokens} new tokens per request, greedy, {args.rounds} requests per client. "
            f"Baseline: sequential `model.generate` fp32 = {base_tps:.1f} tok/s "
            f"(bf16 generate: {bf16_tps:.1f} tok/s).",
            "",
            "| clients | generate tok/s | gateway tok/s | vs generate | vs 1 client | generate TTFT p50/p95 s "
            "| gateway TTFT p50/p95 s |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.write:
        write_section("serving", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
