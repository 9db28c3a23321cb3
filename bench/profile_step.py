"""Where a busy decode step's time goes: the runner in a tight loop at N decode rows (no server, no sampling).

    python bench/profile_step.py [--rows 32 64] [--context 80] [--lora 0] [--profile] [--steps 20]

Builds the runner as the engine does on this machine (converted SmolLM2-135M; models.dtype and
engine.quantization resolved as the engine resolves them, or as given), fills N slots with `--context` tokens of context, and times
`--steps` decode steps per N (median ms, and ms per row).  `--lora K` gives the rows K adapters (round robin).
`--profile` adds torch.profiler's top ops by self CPU time for each N.  A tool for bench/RESULTS.md's
analysis of what flattens the serving curve; it writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from contracts.base_models import embedded_gguf, load_model, prepare
from gateway.engine.local.precision import resolve_dtype, resolve_quantization, resolve_quantized_max_rows
from gateway.engine.local.runner import ModelRunner, PrefillSegment, StepBatch

MODEL = "smollm2-135m-instruct"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--context", type=int, default=80)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="auto", help="models.dtype (auto: as the engine resolves it here)")
    parser.add_argument("--quantization", default="auto", help="engine.quantization (auto: as the engine)")
    parser.add_argument("--quantized-max-rows", type=int, default=None, help="default: auto, as the engine")
    parser.add_argument("--lora", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", type=int, nargs="*", default=[], help="rows to profile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="profile-step-") as tmp, torch.inference_mode():
        model_dir = prepare(MODEL, embedded_gguf(), Path(tmp) / "models")
        model = load_model(model_dir, dtype="float32")
        dtype = resolve_dtype(args.dtype)
        scheme = resolve_quantization(args.quantization, dtype, model_dir)
        print(f"dtype {dtype}, quantization {scheme}, threads {torch.get_num_threads()}", flush=True)
        runner = ModelRunner(
            model,
            max_slots=max(args.rows),
            max_model_len=2048,
            dtype=dtype,
            quantization=scheme,
            quantized_max_rows=resolve_quantized_max_rows(args.quantized_max_rows, dtype),
        )
        adapters = _adapters(model, runner, args.lora, Path(tmp)) if args.lora else []
        del model
        for rows in args.rows:
            for slot in range(rows):  # each slot: `context` tokens of prompt in the cache
                runner.step(StepBatch(prefills=[PrefillSegment(slot, 0, list(range(10, 10 + args.context)))]))
            batch = StepBatch(
                decode_slots=list(range(rows)),
                decode_tokens=[100 + r for r in range(rows)],
                decode_positions=[args.context] * rows,
                decode_adapters=[adapters[r % len(adapters)] if adapters else None for r in range(rows)],
            )
            for _ in range(3):
                runner.step(batch)
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                runner.step(batch)
                times.append((time.perf_counter() - start) * 1000)
            ms = statistics.median(times)
            print(
                f"rows {rows}: step {ms:.1f} ms, {ms / rows:.2f} ms/row, {rows * 1000 / ms:.0f} tok/s",
                flush=True,
            )
            if rows in args.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(5):
                        runner.step(batch)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18), flush=True)
    return 0


def _adapters(model: object, runner: ModelRunner, count: int, tmp: Path) -> list[object]:
    from peft import LoraConfig, get_peft_model

    from contracts.lora import LORA_TARGET_MODULES
    from gateway.engine.local.lora import LoraAdapter

    out = []
    for index in range(count):
        torch.manual_seed(index)
        peft_model = get_peft_model(
            model,  # type: ignore[arg-type]
            LoraConfig(r=8, lora_alpha=16, target_modules=list(LORA_TARGET_MODULES), init_lora_weights=False),
        )
        path = tmp / f"a{index}"
        peft_model.save_pretrained(str(path))
        model = peft_model.unload()
        out.append(LoraAdapter.load(f"a{index}", path, num_layers=len(runner.layers), dtype=runner.dtype))
    return out


if __name__ == "__main__":
    sys.exit(main())
