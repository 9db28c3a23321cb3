"""LoRA training throughput: finetune.trainer vs the Hugging Face Trainer + peft, on the real SmolLM2-135M.

    .venv/bin/python bench/bench_training.py [--rows 30] [--batch-size 4] [--steps 8] [--rounds 3]
                                             [--threads N] [--write]

Both train the same LoRA (r=8, alpha=16, dropout=0.05, all seven linear projections) on the same tokenized
Alpaca rows (prompt masked, reply + <|im_end|> learned), batch_size rows per optimizer step, no gradient
accumulation.  The baseline runs fp32; ours runs in finetune.lora_model.compute_dtype's choice: fp32 on a CPU
without native bf16 (the table says which), bf16 base weights with fp32 LoRA where bf16 is native.

Baseline, measured in the same run: `transformers.Trainer` run the way LLaMA-Factory runs it: padded batches
from `DataCollatorForSeq2Seq` (pad_to_multiple_of=8, labels padded with -100), sdpa attention, logits over
the whole padded batch.  It does not get LLaMA-Factory's default gradient checkpointing, which would only
slow it down further.  Ours: padding-free packed rows, per-example attention, logits only where a label is
learned (a chunked linear + cross-entropy that never keeps the logits), a prompt prefix shared by a batch's
examples computed once, and a lean LoRA forward (finetune.fast_lora: one dropout mask and one A matmul per
input that q/k/v, or gate/up, share; scaling folded into one addmm).

"computed per real token" is what each feeds the model per token of the examples: padding makes it
more than 1 for the baseline; a shared prompt prefix computed once per batch, and example tails after the
last learned token left out, make it less than 1 for ours (both exact: same loss, same gradients).

The two take turns: each round trains a fresh model for `--steps` + 1 steps with one, then with the other
(the order alternates), so a neighbour stealing the CPU for a while hurts both alike.  The first step of
every segment is a warm-up and is not counted.  Throughput counts real tokens only (padding excluded):
"real tokens/s" is all counted tokens over all counted seconds, "median step" the median of per-step
tokens/s, and tokens per CPU-second uses the process's CPU time (all threads) over the same steps.
--threads 1 gives the steadiest numbers on a shared machine: with two threads, every parallel region stalls
while a neighbour holds one of the cores.  With --write the table replaces this benchmark's section in
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.results import cpu_name, write_section
from contracts.base_models import embedded_gguf, load_model, load_tokenizer, prepare
from contracts.lora import LORA_TARGET_MODULES
from contracts.training_data import load_conversations
from finetune.batches import pack
from finetune.chat_template import tokenize
from finetune.lora_model import compute_dtype, cpu_has_native_bf16
from finetune.trainer import TrainConfig, TrainingCancelled, train

MODEL = "smollm2-135m-instruct"
LORA = {"lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.05}
LEARNING_RATE = 2e-4
MAX_SEQ_LENGTH = 512


def risk_rows(count: int, seed: int) -> list[dict[str, str]]:
    """Varied customer-risk Alpaca rows: the shape of a typical LLaMA-Factory dataset."""
    rng = random.Random(seed)
    jobs = ["公务员", "个体经营者", "企业高管", "自由职业者", "退休教师", "外卖骑手", "软件工程师", "农户"]
    debts = ["有房贷", "无负债", "有车贷和信用卡欠款", "有经营贷", "房贷已还清", "有多笔网贷", "有助学贷款"]
    assets = ["有两套房产", "存款20万", "持有股票基金", "无固定资产", "有一辆车", "有商铺出租"]
    records = ["征信良好", "有两次逾期记录", "无信用记录", "近半年多次申请贷款"]
    rows = []
    for _ in range(count):
        age, income = rng.randint(22, 68), rng.choice([6, 12, 18, 30, 50, 80, 120, 300])
        facts = [f"客户年龄{age}岁", f"年收入{income}万", rng.choice(jobs), rng.choice(debts)]
        facts += rng.sample(assets, rng.randint(0, 2)) + rng.sample(records, rng.randint(0, 1))
        level = rng.choice(["低风险", "中等风险", "高风险"])
        output = level if rng.random() < 0.5 else f"{level}。理由:{rng.choice(debts)},{rng.choice(records)}。"
        rows.append({"instruction": "分析客户风险等级", "input": ",".join(facts), "output": output})
    return rows


@dataclass(frozen=True)
class Step:
    tokens: int  # real tokens
    computed: int  # tokens the model ran on: padding included, shared prefixes and cut tails not
    seconds: float
    cpu_seconds: float
    loss: float


class StepClock:
    """Turns "a step just ended" callbacks into Steps; the first step of a segment only starts the clock."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self._last: tuple[float, float] | None = None

    def tick(self, tokens: int, computed: int, loss: float) -> None:
        now = (time.perf_counter(), time.process_time())
        if self._last is not None:
            wall, cpu = now[0] - self._last[0], now[1] - self._last[1]
            self.steps.append(Step(tokens, computed, wall, cpu, loss))
        self._last = now


def ours_segment(
    model_dir: Path, data: Path, out: Path, batch_size: int, steps: int, seed: int
) -> list[Step]:
    clock = StepClock()
    trained = 0
    # The trainer's own batches (same pack arguments), to count the tokens it computes on.
    examples = tokenize(load_conversations(data), load_tokenizer(model_dir), MAX_SEQ_LENGTH)
    limit = batch_size * MAX_SEQ_LENGTH
    batches = [
        b for epoch in (0, 1) for b in pack(examples, limit, seed + epoch, max_examples_per_batch=batch_size)
    ]

    def on_event(kind: str, message: str, payload: dict[str, Any]) -> None:
        nonlocal trained
        if kind == "metrics":
            tokens, trained = payload["trained_tokens"] - trained, payload["trained_tokens"]
            clock.tick(tokens, batches[payload["step"] - 1].tokens, payload["train_loss"])

    polls = 0

    def stop_after_steps() -> bool:  # one poll per step: the warm-up step and `steps` counted ones
        nonlocal polls
        polls += 1
        return polls > steps + 1

    config = TrainConfig(
        base_model_path=model_dir,
        output_dir=out,
        training_file=data,
        seed=seed,
        n_epochs=100,  # stopped after `steps`: a constant learning rate, like the baseline's
        batch_size=batch_size,
        learning_rate=LEARNING_RATE,
        warmup_ratio=0.0,
        max_seq_length=MAX_SEQ_LENGTH,
        device="cpu",
        **LORA,  # type: ignore[arg-type]
    )
    with contextlib.suppress(TrainingCancelled):
        train(config, on_event, stop_after_steps)
    return clock.steps


def hf_segment(model_dir: Path, data: Path, out: Path, batch_size: int, steps: int, seed: int) -> list[Step]:
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    tokenizer = load_tokenizer(model_dir)
    examples = tokenize(load_conversations(data), tokenizer, MAX_SEQ_LENGTH)
    dataset = [
        {"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
        for e in examples
    ]
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8, label_pad_token_id=-100)
    batches: list[tuple[int, int]] = []

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = pad(features)
        batches.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
        return batch

    clock = StepClock()
    losses: list[float] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:  # logging_steps=1: once per step, right after it
                # accelerate's loader collates one batch ahead: the step's batch is number len(losses).
                real, computed = batches[len(losses)]
                losses.append(float(logs["loss"]))
                clock.tick(real, computed, losses[-1])

    torch.manual_seed(seed)
    lora = LoraConfig(
        r=LORA["lora_rank"],
        lora_alpha=LORA["lora_alpha"],
        lora_dropout=LORA["lora_dropout"],
        target_modules=list(LORA_TARGET_MODULES),
        task_type="CAUSAL_LM",
    )
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        max_steps=steps + 1,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,
        seed=seed,
    )
    model = get_peft_model(load_model(model_dir), lora)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[Clock()]).train()
    return clock.steps


@dataclass(frozen=True)
class Summary:
    steps: list[Step]

    def rate(self) -> float:
        return sum(s.tokens for s in self.steps) / sum(s.seconds for s in self.steps)

    def median_rate(self) -> float:
        return statistics.median(s.tokens / s.seconds for s in self.steps)

    def cpu_rate(self) -> float:
        return sum(s.tokens for s in self.steps) / sum(s.cpu_seconds for s in self.steps)

    def computed_per_real(self) -> float:
        return sum(s.computed for s in self.steps) / sum(s.tokens for s in self.steps)

    def mean_loss(self) -> float:
        return statistics.fmean(s.loss for s in self.steps)


Segment = Callable[[Path, Path, Path, int, int, int], list[Step]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="counted steps per segment")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "ft-data")
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_dir = prepare(MODEL, embedded_gguf(), args.data_dir)  # converted once, reused after
    contenders: dict[str, Segment] = {"hf": hf_segment, "ours": ours_segment}
    measured: dict[str, list[Step]] = {"hf": [], "ours": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        root = Path(tmp)
        data = root / "risk.json"
        data.write_text(json.dumps(risk_rows(args.rows, seed=0), ensure_ascii=False))
        for round_ in range(args.rounds):
            order = ["hf", "ours"] if round_ % 2 == 0 else ["ours", "hf"]
            for name in order:
                out = root / f"{name}-{round_}"
                steps = contenders[name](model_dir, data, out, args.batch_size, args.steps, round_)
                measured[name] += steps
                rate = sum(s.tokens for s in steps) / sum(s.seconds for s in steps)
                print(f"round {round_ + 1} {name}: {rate:.0f} real tokens/s", file=sys.stderr, flush=True)

    hf, ours = Summary(measured["hf"]), Summary(measured["ours"])
    ours_dtype = str(compute_dtype(torch.device("cpu"))).removeprefix("torch.")
    lines = [
        f"SmolLM2-135M-Instruct, CPU {cpu_name()} ({torch.get_num_threads()} threads), HF fp32, ours "
        f"{ours_dtype} (native bf16: {cpu_has_native_bf16()}), LoRA r=8 on all linear "
        f"projections, {args.rows} Alpaca rows, batch {args.batch_size}, {args.rounds} rounds of "
        f"{args.steps} counted steps each ({time.perf_counter() - started:.0f} s in all)",
        "",
        "| trainer | real tokens/s | median step tokens/s | tokens/CPU-s | computed per real token "
        "| mean loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, summary in (
        ("HF Trainer + peft (padded, DataCollatorForSeq2Seq)", hf),
        ("finetune.trainer (packed, shared prefix, learned-token fused CE, lean LoRA)", ours),
    ):
        lines.append(
            f"| {label} | {summary.rate():.0f} | {summary.median_rate():.0f} | {summary.cpu_rate():.0f} "
            f"| {summary.computed_per_real():.2f} | {summary.mean_loss():.3f} |"
        )
    lines += [
        "",
        f"**ours / HF: {ours.rate() / hf.rate():.2f}x real tokens/s** "
        f"({ours.median_rate() / hf.median_rate():.2f}x by median step, "
        f"{ours.cpu_rate() / hf.cpu_rate():.2f}x per CPU-second)",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section("training", table)


if __name__ == "__main__":
    main()
