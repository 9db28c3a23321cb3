"""LoRA / QLoRA fine-tuning, readable top to bottom (after nanoGPT and torchtune).

    train(config) = setup -> [micro-steps -> clip -> optimizer step -> log / validate / checkpoint]*
                    -> save the adapter -> cleanup

Where the speed comes from (bench/bench_training.py measures it against the Hugging Face Trainer):
- examples are packed end to end into one row (finetune.data.pack), so no compute is spent on padding, and
  `_packed_attention` runs causal attention per example, so none is spent across examples either (a dense
  block-diagonal mask would cost attention over the whole row and lose sdpa's grouped-query fast path);
- a prompt prefix the examples of a batch share (system prompt, instruction) is computed once, and tokens
  after an example's last learned one not at all: both leave the loss and its gradients unchanged;
- logits are computed only where a label is learned (`logits_to_keep`): for chat data most tokens are prompt,
  and the 49k-wide vocabulary projection is the largest single matmul of a small model;
- on a CPU, LoRA dropout draws its masks as float uniforms (`_CpuDropout`), not double-precision bernoullis.

Checkpoints (adapter + optimizer, scheduler and RNG state) are written atomically; a run resumes from the
latest complete one and continues the exact loss curve it would have followed.  Only counts and losses are
ever reported: never a training row.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface

from finetune.base_model import load_model, load_tokenizer
from finetune.data import IGNORE_INDEX, Batch, Example, load_conversations, pack, tokenize
from gateway.private_files import ensure_private_dir, fsync_dir

__all__ = ["ALL_LINEAR", "EventSink", "TrainConfig", "TrainResult", "TrainingCancelled", "train"]

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EventSink = Callable[[str, str, dict[str, Any]], None]

_PACKED_ATTENTION = "finetune_packed_sdpa"
_PRIVATE_FILE = 0o600
_STATE_JSON, _STATE_TENSORS = "trainer_state.json", "trainer_state.pt"
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
_METRICS_COLUMNS = ("step", "train_loss", "valid_loss", "learning_rate", "tokens_per_second")


class TrainingCancelled(Exception):
    """should_stop() said so; checkpoints already written stay, the staging files do not."""


@dataclass
class TrainConfig:
    """One fine-tuning run; every field documented in its `help` metadata (peft style)."""

    base_model_path: Path = field(metadata={"help": "transformers directory of the base model"})
    output_dir: Path = field(
        metadata={"help": "private (0700) directory for checkpoints/, adapter/ and metrics.csv"},
    )
    training_file: Path = field(metadata={"help": "chat JSONL or Alpaca JSON/JSONL (see finetune.data)"})
    validation_file: Path | None = field(
        default=None,
        metadata={"help": "optional held-out file in the same format; adds valid_loss"},
    )
    seed: int = field(
        default=42,
        metadata={"help": "seeds the LoRA init, dropout and data order: same seed and data, same loss curve"},
    )
    n_epochs: int = field(default=3, metadata={"help": "passes over the training data"})
    batch_size: int = field(
        default=8,
        metadata={
            "help": (
                "examples per micro-batch, packed into one row without padding; an optimizer step sees "
                "batch_size * gradient_accumulation_steps examples (fewer in the last step of an epoch)"
            )
        },
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "micro-batches summed into one optimizer step"},
    )
    max_tokens_per_batch: int | None = field(
        default=None,
        metadata={
            "help": "cap on the tokens of one micro-batch (memory); None = batch_size * max_seq_length"
        },
    )
    max_seq_length: int = field(default=1024, metadata={"help": "examples are truncated to this many tokens"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    warmup_ratio: float = field(
        default=0.03,
        metadata={
            "help": "share of the steps the learning rate ramps up linearly; then it decays linearly to 0"
        },
    )
    max_grad_norm: float = field(
        default=1.0,
        metadata={"help": "gradients are clipped to this global L2 norm"},
    )
    lora_rank: int = field(default=8, metadata={"help": "rank r of the LoRA matrices"})
    lora_alpha: int = field(
        default=16,
        metadata={"help": "LoRA updates are scaled by lora_alpha / lora_rank"},
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input during training"})
    target_modules: tuple[str, ...] = field(
        default=ALL_LINEAR,
        metadata={"help": "the linear projections that get an adapter (a subset of ALL_LINEAR)"},
    )
    quantization_bit: int | None = field(
        default=None,
        metadata={"help": "None: full-precision base; 4: QLoRA, NF4 base via bitsandbytes; 8: LLM.int8 base"},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute activations during backward: less memory, about 30% slower"},
    )
    logging_steps: int = field(
        default=1,
        metadata={"help": "a metrics event every this many optimizer steps (and at the last)"},
    )
    save_steps: int = field(
        default=0,
        metadata={
            "help": "a checkpoint every this many optimizer steps (and at the last); 0 = only at the last"
        },
    )
    eval_steps: int | None = field(
        default=None,
        metadata={"help": "validate every this many steps (and at the last); None = every save_steps"},
    )
    device: Literal["auto", "cpu", "cuda"] = field(
        default="auto",
        metadata={"help": "auto = cuda when torch sees one, else cpu"},
    )
    resume_from: Path | None = field(
        default=None,
        metadata={
            "help": (
                "checkpoint directory to resume from; None = the latest complete one in output_dir, if any"
            )
        },
    )

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value cannot work."""
        positive = ("n_epochs", "batch_size", "gradient_accumulation_steps", "max_seq_length", "lora_rank")
        for name in (*positive, "logging_steps"):
            _check(self, name, getattr(self, name) >= 1, "must be at least 1")
        _check(self, "seed", self.seed >= 0, "must be >= 0")
        _check(self, "training_file", self.training_file.is_file(), "no such file")
        _check(
            self,
            "validation_file",
            self.validation_file is None or self.validation_file.is_file(),
            "no such file",
        )
        _check(
            self, "base_model_path", (self.base_model_path / "config.json").is_file(), "no config.json there"
        )
        _check(self, "learning_rate", 0 < self.learning_rate < 1, "must be in (0, 1)")
        _check(self, "weight_decay", 0 <= self.weight_decay < 1, "must be in [0, 1)")
        _check(self, "warmup_ratio", 0 <= self.warmup_ratio < 1, "must be in [0, 1)")
        _check(self, "max_grad_norm", self.max_grad_norm > 0, "must be > 0")
        _check(self, "lora_alpha", self.lora_alpha > 0, "must be > 0")
        _check(self, "lora_dropout", 0 <= self.lora_dropout < 1, "must be in [0, 1)")
        unknown = set(self.target_modules) - set(ALL_LINEAR)
        _check(self, "target_modules", bool(self.target_modules) and not unknown, f"choose from {ALL_LINEAR}")
        _check(self, "quantization_bit", self.quantization_bit in (None, 4, 8), "must be None, 4 or 8")
        _check(self, "save_steps", self.save_steps >= 0, "must be >= 0")
        _check(self, "eval_steps", self.eval_steps is None or self.eval_steps >= 1, "must be None or >= 1")
        _check(self, "device", self.device in ("auto", "cpu", "cuda"), "must be auto, cpu or cuda")
        _check(
            self, "device", self.device != "cuda" or torch.cuda.is_available(), "torch sees no CUDA device"
        )
        limit = self.max_tokens_per_batch
        _check(
            self, "max_tokens_per_batch", limit is None or limit >= self.max_seq_length, ">= max_seq_length"
        )
        if self.quantization_bit is not None:
            try:
                import bitsandbytes  # noqa: F401 - only its presence is checked here
            except ImportError as exc:
                raise ValueError(
                    f"quantization_bit={self.quantization_bit} needs bitsandbytes (pip install bitsandbytes)"
                ) from exc


def _check(config: TrainConfig, name: str, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name}={getattr(config, name)!r}: {rule}")


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
    config: TrainConfig, on_event: EventSink = _ignore_event, should_stop: Callable[[], bool] = _never
) -> TrainResult:
    """Fine-tune a LoRA adapter; events: started, metrics, validation, checkpoint."""
    config.validate()
    run: _Run | None = None
    try:
        run = setup(config)
        return _train(run, on_event, should_stop)
    finally:
        cleanup(config.output_dir, run)


# --- setup --------------------------------------------------------------------------------------------------


@dataclass
class _Run:
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
    metrics: _MetricsFile
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


def setup(config: TrainConfig) -> _Run:
    ensure_private_dir(config.output_dir)
    _remove_staging(config.output_dir)
    device = _pick_device(config.device)
    tokenizer = load_tokenizer(config.base_model_path)
    conversations = load_conversations(config.training_file)
    examples = tokenize(conversations, tokenizer, config.max_seq_length)
    if not examples:
        raise ValueError("training_file: no example has an assistant token within max_seq_length")
    valid_batches: list[Batch] = []
    if config.validation_file is not None:
        valid = tokenize(load_conversations(config.validation_file), tokenizer, config.max_seq_length)
        if not valid:
            raise ValueError("validation_file: no example has an assistant token within max_seq_length")
        valid_batches = pack(valid, config.batch_size * config.max_seq_length, seed=0)
    accumulation = config.gradient_accumulation_steps
    steps_per_epoch = [
        math.ceil(len(_epoch_batches(config, examples, epoch)) / accumulation)
        for epoch in range(config.n_epochs)
    ]
    total_steps = sum(steps_per_epoch)

    torch.manual_seed(config.seed)  # the LoRA A matrices are drawn from the global generator
    model = _build_model(config, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = math.ceil(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_warmup_decay(warmup, total_steps))
    run = _Run(
        config=config,
        device=device,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        examples=examples,
        dropped=len(conversations) - len(examples),
        valid_batches=valid_batches,
        steps_per_epoch=steps_per_epoch,
        fingerprint=_fingerprint(config),
        metrics=_MetricsFile(config.output_dir / "metrics.csv"),
    )
    checkpoint = config.resume_from or _latest_checkpoint(config.output_dir)
    if checkpoint is not None:
        _load_checkpoint(run, checkpoint)
    run.metrics.open(keep_until_step=run.step)
    return run


def _pick_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def _compute_dtype(device: torch.device) -> torch.dtype:
    # bf16 halves memory and doubles speed on GPUs that have it; CPUs train in fp32 (slow bf16 matmuls).
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _build_model(config: TrainConfig, device: torch.device) -> Any:
    from peft import LoraConfig, get_peft_model

    dtype = _compute_dtype(device)
    if config.quantization_bit is None:
        model = load_model(config.base_model_path, dtype=dtype, device=str(device))
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = _load_quantized(config, device, dtype)
    model.set_attn_implementation(_PACKED_ATTENTION)
    model.config.use_cache = False  # a cache would only cost memory in training
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    if device.type == "cpu":  # on CUDA torch's dropout is already a fused kernel
        for module in peft_model.modules():
            dropouts = getattr(module, "lora_dropout", None)
            if isinstance(dropouts, torch.nn.ModuleDict):
                for name, dropout in dropouts.items():
                    if isinstance(dropout, torch.nn.Dropout):
                        dropouts[name] = _CpuDropout(dropout.p)
    peft_model.train()
    return peft_model


class _CpuDropout(torch.nn.Dropout):
    """nn.Dropout's distribution at about a quarter of its cost on a CPU.

    torch's CPU dropout draws its mask with bernoulli_ in double precision and backpropagates through a
    division; a float uniform draw compared with p gives the same keep-probability.  LoRA applies dropout
    to the input of every adapted projection, so on a CPU this was a tenth of a whole training step.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return input
        keep = torch.rand_like(input).ge_(self.p).mul_(1 / (1 - self.p))
        return input * keep


def _load_quantized(config: TrainConfig, device: torch.device, dtype: torch.dtype) -> Any:
    """QLoRA: the frozen base in NF4 (4 bit, double-quantized) or LLM.int8 (8 bit); adapters stay in `dtype`.

    bitsandbytes >= 0.46 runs both on CPU too (slower than fp32 there: weights are dequantized per matmul).
    """
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if config.quantization_bit == 4:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(config.base_model_path),
        quantization_config=quantization,
        dtype=dtype,
        device_map={"": str(device)},
    )
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def _linear_warmup_decay(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        # (step + 1) so the first step already learns: HF's schedule spends it at lr = 0.
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


# --- train --------------------------------------------------------------------------------------------------


def _train(run: _Run, on_event: EventSink, should_stop: Callable[[], bool]) -> TrainResult:
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
    window = _Window()
    while run.step < total:
        lr = run.scheduler.get_last_lr()[0]
        window.start()
        micro_batches = _micro_batches(run)
        learned = sum(batch.trainable_tokens for batch in micro_batches)
        loss_sum = 0.0
        for batch in micro_batches:
            if should_stop():
                raise TrainingCancelled(f"cancelled at step {run.step}")
            loss = _loss_sum(run.model, batch, run.device)
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
            window = _Window()
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

    adapter_dir = config.output_dir / "adapter"
    _write_dir_atomically(adapter_dir, lambda staging: _save_adapter(run.model, staging))
    return TrainResult(
        adapter_dir=adapter_dir,
        trained_tokens=run.trained_tokens,
        steps=run.step,
        final_loss=run.last_loss,
        valid_loss=run.valid_loss,
        metrics_csv=run.metrics.path,
        checkpoints=_checkpoints(config.output_dir),
    )


def _micro_batches(run: _Run) -> list[Batch]:
    """The micro-batches of optimizer step `run.step`, found from the step number alone."""
    epoch, step = 0, run.step
    while step >= run.steps_per_epoch[epoch]:
        step -= run.steps_per_epoch[epoch]
        epoch += 1
    accumulation = run.config.gradient_accumulation_steps
    return run.batches(epoch)[step * accumulation : (step + 1) * accumulation]


def _loss_sum(model: Any, batch: Batch, device: torch.device) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's learned tokens."""
    targets = torch.tensor(batch.targets, device=device)
    learned = targets != IGNORE_INDEX
    output = model(
        input_ids=torch.tensor([batch.input_ids], device=device),
        position_ids=torch.tensor([batch.position_ids], device=device),
        cu_seq_lens_q=torch.tensor(batch.boundaries),  # read on the host by _packed_attention
        shared_prefix_length=batch.shared_prefix,
        logits_to_keep=learned.unsqueeze(0),  # project onto the vocabulary only where a label is learned
        use_cache=False,
    )
    logits = output.logits.reshape(-1, output.logits.shape[-1])
    return F.cross_entropy(logits.float(), targets[learned], reduction="sum")


def _packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    shared_prefix_length: int = 0,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """Causal sdpa per packed segment: (batch, heads, tokens, dim) in, (batch, tokens, heads, dim) out.

    A segment sees itself causally and, when the batch has one (finetune.data.Batch), the shared prefix.
    The model builds no mask for this implementation (transformers skips mask creation for names it does not
    know), so nothing of size tokens x tokens exists.
    """
    if attention_mask is not None:
        raise ValueError("packed attention takes no attention mask: pack examples instead of padding them")
    bounds = [0, query.shape[2]] if cu_seq_lens_q is None else cu_seq_lens_q.tolist()
    prefix = shared_prefix_length
    outputs = []
    for start, end in pairwise(bounds):
        keys, values, mask = key[:, :, start:end], value[:, :, start:end], None
        if prefix and start >= prefix:  # an example continuing the shared prefix
            keys = torch.cat([key[:, :, :prefix], keys], dim=2)
            values = torch.cat([value[:, :, :prefix], values], dim=2)
            mask = causal_lower_right(end - start, prefix + end - start)  # all of the prefix, then causal
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, start:end],
                keys,
                values,
                attn_mask=mask,
                dropout_p=dropout,
                scale=scaling,
                is_causal=mask is None,
                enable_gqa=True,
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(_PACKED_ATTENTION, _packed_attention)


@torch.no_grad()
def _validate(run: _Run, should_stop: Callable[[], bool]) -> float:
    run.model.eval()  # no dropout: the validation loss is a property of the weights alone
    try:
        total, learned = 0.0, 0
        for batch in run.valid_batches:
            if should_stop():
                raise TrainingCancelled(f"cancelled at step {run.step}")
            total += _loss_sum(run.model, batch, run.device).item()
            learned += batch.trainable_tokens
        return total / learned
    finally:
        run.model.train()


class _Window:
    """Loss and throughput since the last metrics event."""

    def __init__(self) -> None:
        self.tokens = self.learned = 0
        self.loss_sum = self.seconds = 0.0
        self._started = 0.0

    def start(self) -> None:
        self._started = time.perf_counter()

    def add(self, tokens: int, loss_sum: float, learned: int) -> None:
        self.seconds += time.perf_counter() - self._started
        self.tokens += tokens
        self.loss_sum += loss_sum
        self.learned += learned

    def loss(self) -> float:
        return self.loss_sum / self.learned

    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class _MetricsFile:
    """output_dir/metrics.csv: a row per logged or validated step; a resumed run drops rows past its step."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def open(self, *, keep_until_step: int) -> None:
        rows: list[dict[str, str]] = []
        if keep_until_step and self.path.is_file():
            with self.path.open(newline="") as fh:
                rows = [row for row in csv.DictReader(fh) if int(row["step"]) <= keep_until_step]
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _PRIVATE_FILE)
        with os.fdopen(fd, "w", newline="") as fh:
            writer = csv.DictWriter(fh, _METRICS_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, _METRICS_COLUMNS).writerow(row)


# --- checkpoints --------------------------------------------------------------------------------------------


def save_checkpoint(run: _Run) -> Path:
    """output_dir/checkpoints/step-N: the peft adapter plus what resuming needs, all or nothing."""
    state = {
        "step": run.step,
        "trained_tokens": run.trained_tokens,
        "last_loss": run.last_loss,
        "valid_loss": run.valid_loss,
        "fingerprint": run.fingerprint,
    }
    tensors = {
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }

    def fill(staging: Path) -> None:
        _save_adapter(run.model, staging)
        torch.save(tensors, staging / _STATE_TENSORS)
        (staging / _STATE_JSON).write_text(json.dumps(state))

    target = run.config.output_dir / "checkpoints" / f"step-{run.step}"
    _write_dir_atomically(target, fill)
    return target


def _load_checkpoint(run: _Run, checkpoint: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not _is_complete(checkpoint):
        raise ValueError(f"resume_from={str(checkpoint)!r}: not a complete checkpoint")
    state = json.loads((checkpoint / _STATE_JSON).read_text())
    if state["fingerprint"] != run.fingerprint:
        raise ValueError(
            f"resume_from={str(checkpoint)!r}: made with other data or hyperparameters; use a new output_dir"
        )
    weights = load_file(str(checkpoint / "adapter_model.safetensors"), device=str(run.device))
    set_peft_model_state_dict(run.model, weights)
    tensors = torch.load(checkpoint / _STATE_TENSORS, map_location="cpu", weights_only=True)
    run.optimizer.load_state_dict(tensors["optimizer"])
    run.scheduler.load_state_dict(tensors["scheduler"])
    torch.set_rng_state(tensors["rng_cpu"])
    if tensors["rng_cuda"]:
        torch.cuda.set_rng_state_all(tensors["rng_cuda"])
    run.step, run.trained_tokens = state["step"], state["trained_tokens"]
    run.last_loss, run.valid_loss = state["last_loss"], state["valid_loss"]


def _save_adapter(model: Any, directory: Path) -> None:
    # Only the LoRA weights: the engine (gateway/engine/lora.py) refuses anything else.
    model.save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False)
    (directory / "README.md").unlink(missing_ok=True)  # peft's empty model-card template


def _fingerprint(config: TrainConfig) -> str:
    """What fixes the loss curve: a checkpoint resumes only a run with the same fingerprint."""
    settings = asdict(config)
    for name in ("output_dir", "validation_file", "resume_from", "logging_steps", "save_steps", "eval_steps"):
        settings.pop(name)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    with config.training_file.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [path for path in (output_dir / "checkpoints").glob("step-*") if _is_complete(path)]
    return sorted(found, key=lambda path: int(path.name.removeprefix("step-")))


def _latest_checkpoint(output_dir: Path) -> Path | None:
    found = _checkpoints(output_dir)
    return found[-1] if found else None


def _is_complete(path: Path) -> bool:
    return path.name.removeprefix("step-").isdigit() and all(
        (path / name).is_file() for name in (*_ADAPTER_FILES, _STATE_JSON, _STATE_TENSORS)
    )


def _write_dir_atomically(target: Path, fill: Callable[[Path], None]) -> None:
    """Fill a staging dir beside `target`, fsync it, rename it into place: a reader sees all or nothing."""
    parent = ensure_private_dir(target.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", suffix=".tmp", dir=parent))  # 0700
    try:
        fill(staging)
        for path in staging.iterdir():
            path.chmod(_PRIVATE_FILE)
            _fsync_file(path)
        fsync_dir(staging)
        if target.exists():  # os.replace will not replace a non-empty directory: move the old one aside
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", suffix=".tmp", dir=parent))
            os.replace(target, old / target.name)
        os.replace(staging, target)
        fsync_dir(parent)
    finally:
        _remove_staging(parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- cleanup ------------------------------------------------------------------------------------------------


def _remove_staging(directory: Path) -> None:
    """Staging dirs are the run's only temporary files; a crash may leave some, so sweep on start and end."""
    for parent in (directory, directory / "checkpoints"):
        if parent.is_dir():
            for stale in parent.glob(".*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)


def cleanup(output_dir: Path, run: _Run | None) -> None:
    _remove_staging(output_dir)
    if run is not None:
        # The worker trains job after job in one process: hand the memory back now, not at the next GC.
        run.model = None
        run.optimizer.state.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
