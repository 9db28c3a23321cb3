"""Embeddings per second: the gateway at 1 and 8 concurrent clients vs batched transformers in one process.

    .venv/bin/python bench/bench_embeddings.py [--texts 256] [--write]

Baseline, measured in the same run on the same CPU: sentence-transformers-style inference of the same model
(all-MiniLM-L6-v2) in one process, no server: texts sorted by length, batches of 32 tokenized with padding,
one fp32 forward per batch under `torch.inference_mode()`, mean pooling, normalize.  That is the best a
single caller doing its own batching gets; a server's clients usually send one text per request.
Gateway: the real HTTPS server in a subprocess; c clients at once, each sending its share of the same texts
one text per request (the engine batches across requests), and one client sending 32 texts per request.  An
"embedding" is one input's vector.  With --write the table replaces this benchmark's section in
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results import cpu_name, write_section
from contracts.base_models import embedded_gguf, prepare
from contracts.embedding_models import (
    EMBEDDED_EMBEDDING_MODEL,
    embedded_embedding_zip,
    prepare_embedding_model,
)
from tests.e2e.harness import Gateway, make_certs

MODEL = EMBEDDED_EMBEDDING_MODEL
REPO = Path(__file__).resolve().parents[1]
SUBJECTS = ["The bank", "A patient", "The auditor", "Our contract", "The clinic", "A customer", "The policy"]
VERBS = ["requires", "reports", "forbids", "reviews", "approves", "documents", "explains"]
OBJECTS = [
    "a refund within fourteen days",
    "the quarterly credit risk assessment for small businesses in the region",
    "two payslips",
    "fasting for eight hours before any blood glucose measurement is taken at the laboratory",
    "the retention period of clinical notes",
    "a signed consent form",
    "an independent review of every outsourced payment processor and its subcontractors",
]


def texts(count: int) -> list[str]:
    n = len(SUBJECTS)
    return [
        f"{SUBJECTS[i % n]} {VERBS[(i // n) % n]} {OBJECTS[(i // (n * n) + i) % n]} (case {i})."
        for i in range(count)
    ]


def baseline(model_dir: Path, corpus: list[str], batch: int) -> float:
    """Embeddings/s of sentence-transformers-style batched inference in this process."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ordered = sorted(corpus, key=len, reverse=True)  # as SentenceTransformer.encode sorts by length

    def run() -> None:
        with torch.inference_mode():
            for start in range(0, len(ordered), batch):
                encoded = tokenizer(
                    ordered[start : start + batch],
                    padding=True,
                    truncation=True,
                    max_length=256,
                    return_tensors="pt",
                )
                hidden = model(**encoded).last_hidden_state
                mask = encoded["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                torch.nn.functional.normalize(pooled, p=2, dim=1)

    run()  # warm-up
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return len(ordered) / best


async def gateway_round(
    gateway: Gateway, token: str, corpus: list[str], clients: int, per_request: int
) -> float:
    """Embeddings/s: `clients` clients at once, each embedding its share of `corpus`, `per_request` at a time."""
    shares = [corpus[i::clients] for i in range(clients)]

    async def client(share: list[str], http: httpx.AsyncClient) -> int:
        done = 0
        for start in range(0, len(share), per_request):
            body = {"model": MODEL, "input": share[start : start + per_request], "encoding_format": "base64"}
            response = await http.post("/v1/embeddings", json=body)
            response.raise_for_status()
            done += len(response.json()["data"])
        return done

    async with httpx.AsyncClient(
        base_url=gateway.url,
        verify=gateway.verify(),
        timeout=600,
        limits=httpx.Limits(max_connections=clients + 2),
        headers={"Authorization": f"Bearer {token}"},
    ) as http:
        await asyncio.gather(*(client(corpus[i : i + 4], http) for i in range(clients)))  # warm-up
        start = time.perf_counter()
        done = sum(await asyncio.gather(*(client(share, http) for share in shares)))
        elapsed = time.perf_counter() - start
    assert done == len(corpus)
    return done / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    corpus = texts(args.texts)

    with tempfile.TemporaryDirectory(prefix="bench-embeddings-") as tmp:
        root = Path(tmp)
        model_dir = prepare_embedding_model(MODEL, embedded_embedding_zip(), root / "prepared")
        base32 = baseline(model_dir, corpus, 32)
        base1 = baseline(model_dir, corpus[:64], 1)
        # the server needs a chat model too: converted once into the repository's data/, as `make prepare` does
        chat_dir = prepare("smollm2-135m-instruct", embedded_gguf(), REPO / "data")
        make_certs(root / "certs")
        gateway = Gateway(
            data_dir=root / "data",
            certs=root / "certs",
            model_dir=chat_dir,
            extra_env={
                "GATEWAY_LIMITS__REQUESTS_PER_MINUTE": "1000000",
                "GATEWAY_EMBEDDINGS__MODELS": f'{{"{MODEL}": "{model_dir}"}}',
            },
        )
        gateway.start("--no-worker")
        try:
            token = gateway.token("embeddings")
            rows = []
            for clients, per_request in ((1, 1), (8, 1), (1, 32)):
                rate = asyncio.run(gateway_round(gateway, token, corpus, clients, per_request))
                rows.append(
                    f"| gateway, {clients} client{'s' if clients > 1 else ''}, {per_request} text"
                    f"{'s' if per_request > 1 else ''} per request | {rate:.1f} | {rate / base32:.2f}x |"
                )
        finally:
            gateway.stop()

    table = "\n".join(
        [
            f"Model {MODEL} (fp32), {len(corpus)} texts of 12-30 tokens, CPU: {cpu_name()}. Baseline: "
            "sentence-transformers-style batched `transformers` inference in one process (sorted by length, "
            "batches of 32, mean pooling + normalize), same run.",
            "",
            "| what | embeddings/s | vs batched transformers |",
            "|---|---|---|",
            f"| transformers in-process, batches of 32 (baseline) | {base32:.1f} | 1.00x |",
            f"| transformers in-process, one text at a time | {base1:.1f} | {base1 / base32:.2f}x |",
            *rows,
        ]
    )
    print(table)
    if args.write:
        write_section("embeddings", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
