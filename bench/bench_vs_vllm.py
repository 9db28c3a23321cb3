"""Our local engine against vLLM on the same CPU, the same model and the same load, in one run.

    python bench/bench_vs_vllm.py [--concurrency 1 8 16 32 64] [--traffic base|lora|both] [--write]

Needs .venv-vllm (`make vllm`).  Model: the converted SmolLM2-135M both engines load from one directory.
Load (bench/load.py): exactly N streaming requests in flight for each N, `--tokens` new tokens each
(`ignore_eos`, greedy), `--rounds` requests per client.  Traffic:

- base: the base model; ours (engine defaults, tenant limits raised: they are policy, not speed) against
  vLLM without LoRA, its best setting for this traffic;
- lora: mixed traffic over `--adapters` fine-tuned adapters (random-weight peft LoRA, r=8 on every linear
  projection, made here), request i of client c naming adapter (c + i) mod 4; ours loads them through its
  own path (fine-tuned model rows in its store, hot-loaded into the engine), vLLM serves the same
  directories with `--enable-lora --max-loras 4 --max-lora-rank 8 --lora-modules name=path ...`.

Per traffic each engine is started fresh, back to back (ours, then vLLM), each started as it ships: ours as
`gateway serve` over HTTPS (tests/e2e/harness.py), vLLM as `python -m vllm.entrypoints.openai.api_server`
(gateway/engine/vllm/server.py's command line, VLLM_CPU_KVCACHE_SPACE=2 unless set).  With --write each
traffic's table updates its part of the vs-vllm section of bench/RESULTS.md (`vs-vllm-base`, `vs-vllm-lora`)
after every N, so a cut-short run keeps what it measured; the cells of earlier runs stay (each cell
names its run) unless `--fresh`, so one traffic may be measured in several locked runs of under 15 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import Burst, client_limits, streams
from bench.results import RESULTS, cpu_name, write_section
from contracts.base_models import embedded_gguf, prepare
from contracts.lora import LORA_TARGET_MODULES
from contracts.names import fine_tuned_name
from tests.e2e.harness import REPO, Gateway, free_port, make_certs

MODEL = "smollm2-135m-instruct"
TENANT = "acme"
RANK = 8
MAX_MODEL_LEN = 2048

Results = dict[int, Burst]


def make_adapters(model_dir: Path, out: Path, count: int) -> list[Path]:
    """`count` peft LoRA adapters (r=8, all linear projections) with random, non-zero weights."""
    import torch
    from peft import LoraConfig, get_peft_model

    from contracts.base_models import load_model

    paths = []
    for index in range(count):
        torch.manual_seed(1000 + index)
        model = load_model(model_dir, dtype="float32")
        config = LoraConfig(
            r=RANK, lora_alpha=2 * RANK, target_modules=list(LORA_TARGET_MODULES), init_lora_weights=False
        )
        peft_model = get_peft_model(model, config)
        with torch.no_grad():  # a trained adapter's size: a small change to the base model's outputs
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.05)
        path = out / f"bench{index}"
        peft_model.save_pretrained(str(path))
        paths.append(path)
    return paths


def register_adapters(data_dir: Path, adapters: Sequence[Path]) -> list[str]:
    """Our adapter loading path: one succeeded job and its fine-tuned model row per adapter in the store
    (what the fine-tuning worker writes), copied under the data dir; the gateway registers them at start-up
    and loads each into its engine on first use."""
    import shutil

    from gateway.store import JobRecord, ModelRecord, Store

    data_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
    store = Store.open(data_dir)
    names = []
    try:
        for index, source in enumerate(adapters):
            job_id = f"ftjob-bench{index:06d}"
            relative = Path("adapters") / job_id / source.name
            shutil.copytree(source, data_dir / relative)
            now = int(time.time())
            store.jobs.add(
                JobRecord(
                    id=job_id,
                    tenant=TENANT,
                    subject="bench",
                    model=MODEL,
                    training_file="file-bench",
                    seed=index,
                    hyperparameters={},
                    status="succeeded",
                    created_at=now,
                    suffix=source.name,
                )
            )
            name = fine_tuned_name(MODEL, TENANT, source.name, job_id)
            store.models.add(
                ModelRecord(
                    id=name, tenant=TENANT, base=MODEL, job_id=job_id, path=str(relative), created_at=now
                )
            )
            names.append(name)
    finally:
        store.close()
    return names


def run_ours(
    root: Path,
    model_dir: Path,
    adapters: Sequence[Path],
    args: argparse.Namespace,
    tag: str,
    done: Callable[[Results], None],
) -> Results:
    data_dir = root / f"data-{tag}"
    models = register_adapters(data_dir, adapters) if adapters else [MODEL]
    gateway = Gateway(
        data_dir=data_dir,
        certs=root / "certs",
        model_dir=model_dir,
        extra_env={
            "GATEWAY_LIMITS__REQUESTS_PER_MINUTE": "1000000",
            "GATEWAY_LIMITS__TENANT_CONCURRENCY": "100000",
            **dict(kv.split("=", 1) for kv in args.ours_env),
        },
    )
    gateway.start("--no-worker")
    try:
        token = gateway.token()
        results: Results = {}
        for n in args.concurrency:

            async def burst(n: int = n) -> Burst:
                async with httpx.AsyncClient(
                    base_url=gateway.url,
                    verify=gateway.verify(),
                    timeout=1800,
                    limits=client_limits(n),
                    headers={"Authorization": f"Bearer {token}"},
                ) as http:
                    return await streams(
                        http, concurrency=n, tokens=args.tokens, rounds=args.rounds, models=models
                    )

            results[n] = asyncio.run(burst())
            print(f"ours {tag} N={n}: {_cell(results[n])}", flush=True)
            done(results)
        return results
    finally:
        gateway.stop()


def run_vllm(
    root: Path,
    model_dir: Path,
    adapters: Sequence[Path],
    args: argparse.Namespace,
    tag: str,
    done: Callable[[Results], None],
) -> Results:
    from gateway.engine.vllm.server import ManagedServer, server_command

    port = free_port()
    names = [path.name for path in adapters]
    extra = ["--lora-modules", *(f"{path.name}={path}" for path in adapters)] if adapters else []
    command = server_command(
        str(args.vllm_python),
        model_dir,
        MODEL,
        port=port,
        max_model_len=MAX_MODEL_LEN,
        max_loras=len(adapters) or 1,
        max_lora_rank=RANK,
        tensor_parallel_size=1,
        enable_lora=bool(adapters),
        extra=extra,
    )
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    server = ManagedServer(MODEL, command, root / f"vllm-{tag}.log", env)
    server.start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + args.vllm_timeout
        with httpx.Client(timeout=5) as client:
            while True:
                if not server.alive():
                    raise RuntimeError(f"vLLM exited:\n{(root / f'vllm-{tag}.log').read_text()[-4000:]}")
                try:
                    if client.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vLLM not ready after {args.vllm_timeout}s")
                time.sleep(1)
        results: Results = {}
        for n in args.concurrency:

            async def burst(n: int = n) -> Burst:
                async with httpx.AsyncClient(base_url=url, timeout=1800, limits=client_limits(n)) as http:
                    return await streams(
                        http, concurrency=n, tokens=args.tokens, rounds=args.rounds, models=names or [MODEL]
                    )

            results[n] = asyncio.run(burst())
            print(f"vLLM {tag} N={n}: {_cell(results[n])}", flush=True)
            done(results)
        return results
    finally:
        server.stop()


def _cell(burst: Burst) -> str:
    return f"{burst.tokens_per_second:.1f} tok/s, TTFT p50 {burst.ttft_p50:.2f} s"


# What a section shows: engine -> N -> {"tps", "ttft", "run"}; kept in the section as a comment, so a traffic
# measured in several shorter locked runs (`--concurrency`, `--engines`) adds up to one table, each cell
# saying which run measured it.
Cells = dict[str, dict[str, dict[str, float | str]]]
_DATA = re.compile(r"<!-- vs-vllm-data (\{.*?\}) -->")


def _cells(results: Results, run: str) -> dict[str, dict[str, float | str]]:
    return {
        str(n): {"tps": round(b.tokens_per_second, 2), "ttft": round(b.ttft_p50, 3), "run": run}
        for n, b in results.items()
    }


def previous_cells(kind: str) -> Cells:
    text = RESULTS.read_text() if RESULTS.exists() else ""
    start, end = f"<!-- vs-vllm-{kind}:start -->", f"<!-- vs-vllm-{kind}:end -->"
    if start not in text or end not in text:
        return {}
    match = _DATA.search(text.split(start, 1)[1].split(end, 1)[0])
    return json.loads(match[1]) if match else {}


def table(kind: str, cells: Cells) -> str:
    lora = kind == "lora"
    label = "vLLM --enable-lora" if lora else "vLLM (no LoRA)"
    title = (
        "Mixed traffic over 4 fine-tuned LoRA adapters (r=8, all linear projections; request i of client c "
        "names adapter (c + i) mod 4), ours against vLLM with --enable-lora serving the same adapters"
        if lora
        else "Base-model traffic, ours against vLLM without LoRA (its best setting for it)"
    )
    ours, vllm = cells.get("ours", {}), cells.get("vllm", {})
    ns = sorted({*ours, *vllm}, key=int)

    def row(name: str, values: list[str]) -> str:
        return f"| {name} | " + " | ".join(values) + " |"

    def value(side: dict[str, dict[str, float | str]], n: str, key: str, fmt: str) -> str:
        return format(float(side[n][key]), fmt) if n in side else "-"

    def ratio(n: str, key: str) -> str:
        if n not in ours or n not in vllm:
            return "-"
        return f"{float(ours[n][key]) / float(vllm[n][key]):.2f}x"

    runs = sorted({str(c["run"]) for side in (ours, vllm) for c in side.values()})
    run_of = {run: chr(ord("a") + i) for i, run in enumerate(runs)}

    def run_row(side: dict[str, dict[str, float | str]]) -> list[str]:
        return [run_of[str(side[n]["run"])] if n in side else "-" for n in ns]

    lines = [
        f"**{title}**",
        "",
        row("requests in flight", ns),
        row("---", ["---"] * len(ns)),
        row("ours tok/s", [value(ours, n, "tps", ".1f") for n in ns]),
        row(f"{label} tok/s", [value(vllm, n, "tps", ".1f") for n in ns]),
        row("**ours / vLLM tok/s**", [f"**{ratio(n, 'tps')}**" for n in ns]),
        row("ours TTFT p50 s", [value(ours, n, "ttft", ".2f") for n in ns]),
        row(f"{label} TTFT p50 s", [value(vllm, n, "ttft", ".2f") for n in ns]),
        row("ours / vLLM TTFT p50", [ratio(n, "ttft") for n in ns]),
        row("run (ours / vLLM)", [f"{o} / {v}" for o, v in zip(run_row(ours), run_row(vllm), strict=True)]),
        "",
        "Runs: " + "; ".join(f"{letter} = {run}" for run, letter in run_of.items()) + ".",
        "",
        f"<!-- vs-vllm-data {json.dumps(cells, sort_keys=True)} -->",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--traffic", choices=("base", "lora", "both"), default="both")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--engines", choices=("ours", "vllm", "both"), default="both")
    parser.add_argument("--ours-env", nargs="*", default=[], help="extra GATEWAY_*=value for ours (A/B)")
    parser.add_argument("--vllm-python", type=Path, default=REPO / ".venv-vllm" / "bin" / "python")
    parser.add_argument("--vllm-timeout", type=float, default=900)
    parser.add_argument("--write", action="store_true", help="update the vs-vllm section of bench/RESULTS.md")
    parser.add_argument(
        "--fresh", action="store_true", help="with --write: drop the cells earlier runs left in the section"
    )
    args = parser.parse_args()
    if args.engines != "ours" and not args.vllm_python.exists():
        print(f"no {args.vllm_python}: run `make vllm` first", file=sys.stderr)
        return 2
    kinds = ["base", "lora"] if args.traffic == "both" else [args.traffic]
    run = (
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, `bench_vs_vllm.py --traffic {args.traffic} --engines "
        f"{args.engines} --concurrency {' '.join(map(str, args.concurrency))}"
        + (f" --ours-env {' '.join(args.ours_env)}`" if args.ours_env else "`")
    )
    printed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-vs-vllm-") as tmp:
        root = Path(tmp)
        model_dir = prepare(MODEL, embedded_gguf(), root / "models")
        make_certs(root / "certs")
        adapter_paths = make_adapters(model_dir, root / "adapters", args.adapters) if "lora" in kinds else []
        for kind in kinds:
            adapters = adapter_paths if kind == "lora" else []
            cells: Cells = {} if args.fresh or not args.write else previous_cells(kind)
            for engine, runner in (("ours", run_ours), ("vllm", run_vllm)):
                if args.engines not in (engine, "both"):
                    continue

                def done(
                    results: Results, engine: str = engine, cells: Cells = cells, kind: str = kind
                ) -> None:
                    cells.setdefault(engine, {}).update(_cells(results, run))
                    _write(args, kind, cells)  # after every N: a run cut short keeps what it measured

                runner(root, model_dir, adapters, args, kind, done)
            printed.append(_body(args, kind, cells))
    print("\n\n".join(printed))
    return 0


def _body(args: argparse.Namespace, kind: str, cells: Cells) -> str:
    return "\n".join(
        [
            f"Model {MODEL} (converted once; both engines load the same directory); CPU: {cpu_name()}, "
            f"{os.cpu_count()} cores. vllm-cpu 0.32 (`python -m vllm.entrypoints.openai.api_server`, "
            "VLLM_CPU_KVCACHE_SPACE=2) against ours (`gateway serve`, local engine defaults, tenant limits "
            f"raised: they are policy, not speed). {args.tokens} new tokens per request (ignore_eos, greedy), "
            f"exactly N requests in flight, {args.rounds} rounds per client; in each run every engine is "
            "started fresh, back to back (ours first). Ratio > 1x: ours faster; TTFT ratio < 1x: ours sooner.",
            "",
            table(kind, cells),
        ]
    )


def _write(args: argparse.Namespace, kind: str, cells: Cells) -> None:
    """Each traffic kind owns one part of the vs-vllm section (`vs-vllm-base`, `vs-vllm-lora`)."""
    if args.write:
        write_section(f"vs-vllm-{kind}", _body(args, kind, cells))


if __name__ == "__main__":
    sys.exit(main())
