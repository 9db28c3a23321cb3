"""Profile or time finetune.trainer's steps alone, with parts switched off, for same-run A/B comparisons.

    .venv/bin/python bench/profile_training.py [--threads 1] [--steps 6] [--profile]
                                               [--without fast_lora] [--without fused_ce]

The same data and LoRA settings as bench/bench_training.py (30 Alpaca rows, batch 4, r=8 on all seven
projections); one warm-up step, then `--steps` timed ones.  Prints real tokens/s, or with --profile the
torch.profiler table by self CPU time.  `--without fast_lora` keeps peft's LoRA forward, `--without fused_ce`
takes the model's logits and F.cross_entropy.  Run it under /tmp/cpu-heavy.lock on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.bench_training import LEARNING_RATE, LORA, MAX_SEQ_LENGTH, MODEL, risk_rows
from contracts.base_models import embedded_gguf, prepare
from finetune import fast_lora, packed, trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--without", action="append", default=[], choices=["fast_lora", "fused_ce"])
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "ft-data")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if "fast_lora" in args.without:
        fast_lora.install = lambda model: 0  # type: ignore[assignment]
    if "fused_ce" in args.without:
        packed._plain_head = lambda base: None  # type: ignore[assignment]
    model_dir = prepare(MODEL, embedded_gguf(), args.data_dir)
    with tempfile.TemporaryDirectory(prefix="profile-training-") as tmp:
        data = Path(tmp) / "risk.json"
        data.write_text(json.dumps(risk_rows(30, seed=0), ensure_ascii=False))
        config = trainer.TrainConfig(
            base_model_path=model_dir,
            output_dir=Path(tmp) / "out",
            training_file=data,
            seed=0,
            n_epochs=100,
            batch_size=4,
            learning_rate=LEARNING_RATE,
            warmup_ratio=0.0,
            max_seq_length=MAX_SEQ_LENGTH,
            device="cpu",
            **LORA,  # type: ignore[arg-type]
        )
        run = trainer.setup(config)
        try:
            step(run)  # warm-up
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(args.steps):
                        step(run)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
            else:
                started, tokens = time.perf_counter(), 0
                for _ in range(args.steps):
                    tokens += step(run)
                rate = tokens / (time.perf_counter() - started)
                print(f"{rate:.1f} real tokens/s (without: {', '.join(args.without) or 'nothing'})")
        finally:
            trainer.cleanup(config.output_dir, run)


def step(run: trainer.Run) -> int:
    """One optimizer step as trainer._train runs it; returns its real tokens."""
    batches = trainer._micro_batches(run)
    learned = sum(batch.trainable_tokens for batch in batches)
    for batch in batches:
        (packed.loss_sum(run.model, batch, run.device) / learned).backward()
    torch.nn.utils.clip_grad_norm_(run.optimizer.param_groups[0]["params"], run.config.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return sum(batch.example_tokens for batch in batches)


if __name__ == "__main__":
    main()
