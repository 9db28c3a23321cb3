"""LoRA / QLoRA fine-tuning, readable top to bottom (after nanoGPT and torchtune).

    train(config) = setup -> [micro-steps -> clip -> optimizer step -> log / validate / checkpoint]*
                    -> save the adapter -> cleanup

This module is the loop and what it holds (Run); the pieces it calls each have their own:
    finetune.config       TrainConfig: the run's hyperparameters and their checks
    finetune.lora_model   the base model (quantized or not) with LoRA adapters, on its device
    finetune.packed       the forward pass over a packed row: attention per example, learned-token logits
    finetune.fast_lora    the lean LoRA forward: shared dropout mask and A matmul per input, one addmm
    finetune.checkpoints  atomic checkpoints, the fingerprint that guards resuming, the staging sweep
    finetune.metrics      loss / throughput windows and metrics.csv

Where the speed comes from (bench/bench_training.py measures it against the Hugging Face Trainer):
- examples are packed end to end into one row (finetune.batches.pack), so no compute is spent on padding, and
  the packed attention (finetune.packed) runs causal attention per example, so none is spent across examples
  either (a dense block-diagonal mask would cost attention over the whole row and lose sdpa's grouped-query
  fast path);
- a prompt prefix the examples of a batch share (system prompt, instruction) is computed once, and tokens
  after an example's last learned one not at all: both leave the loss and its gradients unchanged;
- logits are computed only where a label is learned, chunk by chunk with the gradient found in the same pass
  (finetune.packed.linear_cross_entropy): for chat data most tokens are prompt, and the 49k-wide vocabulary
  projection is the largest single matmul of a small model;
- LoRA runs a lean forward (finetune.fast_lora): the projections that read one input (q/k/v, gate/up) share
  one dropout mask and one matmul against their stacked A matrices, and scaling folds into one addmm;
- bf16 base weights with fp32 LoRA parameters under autocast where bf16 is native (CUDA, AVX512-BF16 / AMX
  CPUs: finetune.lora_model.compute_dtype); fp32 where it would be emulated.

Checkpoints (adapter + optimizer, scheduler and RNG state) are written atomically, and sealed by the
`sealer` train() is given (the worker passes the data dir's cipher, so with encryption at rest nothing the
run writes is plaintext on disk); a run resumes from the latest complete one and continues the exact loss
curve it would have followed.  Only counts and losses are
ever reported: never a training row.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from contracts.base_models import load_tokenizer
from contracts.blobs import Sealer
from contracts.private_files import ensure_private_dir
from contracts.training_data import load_conversations
from finetune import packed
from finetune.batches import Batch, pack
from finetune.chat_template import Example, tokenize
from finetune.checkpoints import (
    complete_checkpoints,
    fingerprint,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    remove_staging,
    save_adapter,
    save_checkpoint,
    write_dir_atomically,
)
from finetune.config import InvalidSetting, TrainConfig
from finetune.lora_model import build_model, pick_device
from finetune.metrics import MetricsFile, Window
from gateway.security.encryption import NullCipher

# TrainConfig and InvalidSetting live in finetune.config; they are named here too because this module is the
# trainer's interface (the worker, bench/bench_training.py and the tests take them from here).
__all__ = ["EventSink", "InvalidSetting", "TrainConfig", "TrainResult", "TrainingCancelled", "train"]

EventSink = Callable[[str, str, dict[str, Any]], None]


class TrainingCancelled(Exception):
    """should_stop() said so; checkpoints already written stay, the staging files do not."""


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    trained_tokens: int  # every real token the model trained on, prompts included, summed over epochs
    steps: int
    final_loss: float  # training loss of the last optimizer step
    valid_loss: float | None
    metrics_csv: Path  # step,train_loss,valid_loss,learning_rate,tokens_per_second
    checkpoints: list[Path]


def _ignore_event(kind: str, message: str, data: dict[str, Any]) -> None:
    pass


def _never() -> bool:
    return False


def train(
    config: TrainConfig,
    on_event: EventSink = _ignore_event,
    should_stop: Callable[[], bool] = _never,
    *,
    sealer: Sealer | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter; events: started, metrics, validation, checkpoint.  `sealer` writes (and
    reads back) every file of the run: the data dir's cipher; None writes plain files."""
    config.validate()
    run: Run | None = None
    try:
        run = setup(config, sealer)
        return _train(run, on_event, should_stop)
    finally:
        cleanup(config.output_dir, run)


@dataclass
class Run:
    """Everything a training run holds; the last block moves with every step, the rest is fixed at setup."""

    config: TrainConfig
    device: torch.device
    model: Any  # peft.PeftModelForCausalLM
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    examples: list[Example]
    dropped: int
    valid_batches: list[Batch]
    steps_per_epoch: list[int]
    fingerprint: str
    metrics: MetricsFile
    sealer: Sealer
    step: int = 0
    trained_tokens: int = 0
    last_loss: float = math.nan
    valid_loss: float | None = None
    _epoch: tuple[int, list[Batch]] | None = None

    @property
    def total_steps(self) -> int:
        return sum(self.steps_per_epoch)

    def batches(self, epoch: int) -> list[Batch]:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, _epoch_batches(self.config, self.examples, epoch))
        return self._epoch[1]


def _epoch_batches(config: TrainConfig, examples: list[Example], epoch: int) -> list[Batch]:
    limit = config.max_tokens_per_batch or config.batch_size * config.max_seq_length
    # A fresh order each epoch, fixed by (seed, epoch): resuming needs nothing but the step number.
    return pack(examples, limit, config.seed + epoch, max_examples_per_batch=config.batch_size)


def setup(config: TrainConfig, sealer: Sealer | None = None) -> Run:
    sealer = sealer or NullCipher()
    ensure_private_dir(config.output_dir)
    remove_staging(config.output_dir)
    device = pick_device(config.device)
    tokenizer = load_tokenizer(config.base_model_path)
    conversations = load_conversations(config.training_file)
    examples = tokenize(conversations, tokenizer, config.max_seq_length)
    if not examples:
        raise InvalidSetting(
            "training_file", "training_file: no example has an assistant token within max_seq_length"
        )
    valid_batches: list[Batch] = []
    if config.validation_file is not None:
        valid = tokenize(load_conversations(config.validation_file), tokenizer, config.max_seq_length)
        if not valid:
            raise InvalidSetting(
                "validation_file", "validation_file: no example has an assistant token within max_seq_length"
            )
        valid_batches = pack(valid, config.batch_size * config.max_seq_length, seed=0)
    accumulation = config.gradient_accumulation_steps
    steps_per_epoch = [
        math.ceil(len(_epoch_batches(config, examples, epoch)) / accumulation)
        for epoch in range(config.n_epochs)
    ]
    total_steps = sum(steps_per_epoch)

    torch.manual_seed(config.seed)  # the LoRA A matrices are drawn from the global generator
    model = build_model(config, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = math.ceil(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_warmup_decay(warmup, total_steps))
    run = Run(
        config=config,
        device=device,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        examples=examples,
        dropped=len(conversations) - len(examples),
        valid_batches=valid_batches,
        steps_per_epoch=steps_per_epoch,
        fingerprint=fingerprint(config),
        metrics=MetricsFile(config.output_dir / "metrics.csv", sealer),
        sealer=sealer,
    )
    checkpoint = config.resume_from or latest_checkpoint(config.output_dir)
    if checkpoint is not None:
        load_checkpoint(run, checkpoint)
    return run


def _linear_warmup_decay(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        # (step + 1) so the first step already learns: HF's schedule spends it at lr = 0.
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


# --- train --------------------------------------------------------------------------------------------------


def _train(run: Run, on_event: EventSink, should_stop: Callable[[], bool]) -> TrainResult:
    config, total = run.config, run.total_steps
    eval_every = config.eval_steps or config.save_steps
    on_event(
        "started",
        f"Fine-tuning started: {len(run.examples)} examples, {total} steps",
        {
            "examples": len(run.examples),
            "dropped_examples": run.dropped,
            "total_steps": total,
            "resumed_from_step": run.step,
            "trainable_params": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
            "device": run.device.type,
            "quantization_bit": config.quantization_bit,
        },
    )
    window = Window()
    while run.step < total:
        lr = run.scheduler.get_last_lr()[0]
        window.start()
        micro_batches = _micro_batches(run)
        learned = sum(batch.trainable_tokens for batch in micro_batches)
        loss_sum = 0.0
        for batch in micro_batches:
            if should_stop():
                raise TrainingCancelled(f"cancelled at step {run.step}")
            loss = packed.loss_sum(run.model, batch, run.device)
            # Normalise by the whole step's learned tokens: every token weighs the same, however packed.
            (loss / learned).backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(run.optimizer.param_groups[0]["params"], config.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        tokens = sum(batch.example_tokens for batch in micro_batches)
        run.trained_tokens += tokens
        run.last_loss = loss_sum / learned
        window.add(tokens, loss_sum, learned)

        last = run.step == total
        log_now = run.step % config.logging_steps == 0 or last
        validate_now = bool(run.valid_batches) and (last or (eval_every > 0 and run.step % eval_every == 0))
        row: dict[str, Any] = {"step": run.step}
        if log_now:
            row |= {"train_loss": window.loss(), "learning_rate": lr, "tokens_per_second": window.rate()}
            data = row | {"total_steps": total, "trained_tokens": run.trained_tokens}
            on_event("metrics", f"Step {run.step}/{total}: training loss={row['train_loss']:.4f}", data)
            window = Window()
        if validate_now:
            run.valid_loss = valid_loss = _validate(run, should_stop)
            row["valid_loss"] = valid_loss
            message = f"Step {run.step}/{total}: validation loss={valid_loss:.4f}"
            on_event("validation", message, {"step": run.step, "valid_loss": valid_loss})
        if log_now or validate_now:
            run.metrics.write(row)
        if last or (config.save_steps and run.step % config.save_steps == 0):
            path = save_checkpoint(run)
            on_event(
                "checkpoint", f"Checkpoint saved at step {run.step}", {"step": run.step, "path": str(path)}
            )
            prune_checkpoints(
                config.output_dir, config.keep_checkpoints
            )  # published above: the disk is bounded

    adapter_dir = config.output_dir / "adapter"
    write_dir_atomically(adapter_dir, lambda staging: save_adapter(run.model, staging, run.sealer))
    return TrainResult(
        adapter_dir=adapter_dir,
        trained_tokens=run.trained_tokens,
        steps=run.step,
        final_loss=run.last_loss,
        valid_loss=run.valid_loss,
        metrics_csv=run.metrics.save(),
        checkpoints=complete_checkpoints(config.output_dir),
    )


def _micro_batches(run: Run) -> list[Batch]:
    """The micro-batches of optimizer step `run.step`, found from the step number alone."""
    epoch, step = 0, run.step
    while step >= run.steps_per_epoch[epoch]:
        step -= run.steps_per_epoch[epoch]
        epoch += 1
    accumulation = run.config.gradient_accumulation_steps
    return run.batches(epoch)[step * accumulation : (step + 1) * accumulation]


@torch.no_grad()
def _validate(run: Run, should_stop: Callable[[], bool]) -> float:
    run.model.eval()  # no dropout: the validation loss is a property of the weights alone
    try:
        total, learned = 0.0, 0
        for batch in run.valid_batches:
            if should_stop():
                raise TrainingCancelled(f"cancelled at step {run.step}")
            total += packed.loss_sum(run.model, batch, run.device).item()
            learned += batch.trainable_tokens
        return total / learned
    finally:
        run.model.train()


# --- cleanup ------------------------------------------------------------------------------------------------


def cleanup(output_dir: Path, run: Run | None) -> None:
    remove_staging(output_dir)
    if run is not None:
        # The worker trains job after job in one process: hand the memory back now, not at the next GC.
        run.model = None
        run.optimizer.state.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
