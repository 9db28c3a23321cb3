"""Checkpoints: output_dir/checkpoints/step-N, written all or nothing, and resuming from them bit-exactly.

A checkpoint holds the adapter plus everything the next step depends on (optimizer, scheduler and RNG state,
the step and token counts) and the run's fingerprint, so a run resumes only from a checkpoint of the same
data and hyperparameters.  Every directory the trainer writes, the final adapter included, goes through
`write_dir_atomically`: filled in a hidden staging directory beside its target, fsynced, renamed into place.
The staging directories are the run's only temporary files; `remove_staging` sweeps what a crash left.

Sealed at rest: every file of a checkpoint (and of the final adapter) goes to disk through the run's sealer,
the data dir's cipher (gateway.security.encryption), so with `privacy.encrypt_at_rest` on no adapter weight,
optimizer state or loss leaves memory in plaintext.  Nothing is staged in plaintext either: the adapter is
serialised in memory (`adapter_files`, byte for byte what peft's save_pretrained writes), and resuming
decrypts into memory, never into a file.  With encryption off the sealer is a NullCipher: plain files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from contracts.base_models import model_identity
from contracts.blobs import Sealer
from contracts.private_files import ensure_private_dir, fsync_dir
from finetune.config import TrainConfig

if TYPE_CHECKING:
    from finetune.trainer import Run

__all__ = [
    "adapter_files",
    "complete_checkpoints",
    "fingerprint",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "read_sealed",
    "remove_staging",
    "save_adapter",
    "save_checkpoint",
    "write_dir_atomically",
    "write_sealed",
]

_PRIVATE_FILE = 0o600
_STATE_JSON, _STATE_TENSORS = "trainer_state.json", "trainer_state.pt"
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
# Settings that leave the loss curve as it is: where things go, what is validated, how often to report.
_PIECE = 1 << 20  # bytes handed to the sealer at a time (it re-chunks them)
_NOT_FINGERPRINTED = (
    "output_dir",
    "validation_file",
    "resume_from",
    "logging_steps",
    "save_steps",
    "eval_steps",
)


def save_checkpoint(run: Run) -> Path:
    """output_dir/checkpoints/step-N: the peft adapter plus what resuming needs, all or nothing, sealed."""
    state = {
        "step": run.step,
        "trained_tokens": run.trained_tokens,
        "last_loss": run.last_loss,
        "valid_loss": run.valid_loss,
        "fingerprint": run.fingerprint,
        "metrics": run.metrics.rows,  # metrics.csv so far: a resumed run's results file holds every step
    }
    tensors = {
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }

    def fill(staging: Path) -> None:
        save_adapter(run.model, staging, run.sealer)
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        write_sealed(run.sealer, buffer.getbuffer(), staging / _STATE_TENSORS)
        del buffer
        write_sealed(run.sealer, json.dumps(state).encode(), staging / _STATE_JSON)

    target = run.config.output_dir / "checkpoints" / f"step-{run.step}"
    write_dir_atomically(target, fill)
    return target


def load_checkpoint(run: Run, checkpoint: Path) -> None:
    """Resume `run` from `checkpoint`, decrypting into memory only."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load

    if not _is_complete(checkpoint):
        raise ValueError(f"resume_from={str(checkpoint)!r}: not a complete checkpoint")
    state = json.loads(read_sealed(run.sealer, checkpoint / _STATE_JSON))
    if state["fingerprint"] != run.fingerprint:
        raise ValueError(
            f"resume_from={str(checkpoint)!r}: made with other data or hyperparameters; use a new output_dir"
        )
    weights = load(read_sealed(run.sealer, checkpoint / "adapter_model.safetensors"))
    set_peft_model_state_dict(run.model, {name: t.to(run.device) for name, t in weights.items()})
    del weights
    raw = read_sealed(run.sealer, checkpoint / _STATE_TENSORS)
    tensors = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    del raw
    run.optimizer.load_state_dict(tensors["optimizer"])
    run.scheduler.load_state_dict(tensors["scheduler"])
    torch.set_rng_state(tensors["rng_cpu"])
    if tensors["rng_cuda"]:
        torch.cuda.set_rng_state_all(tensors["rng_cuda"])
    run.step, run.trained_tokens = state["step"], state["trained_tokens"]
    run.last_loss, run.valid_loss = state["last_loss"], state["valid_loss"]
    run.metrics.resume(state.get("metrics", []), until_step=run.step)


def save_adapter(model: Any, directory: Path, sealer: Sealer) -> None:
    """The LoRA weights and their config, sealed, as `adapter_files` makes them."""
    for name, data in adapter_files(model).items():
        write_sealed(sealer, data, directory / name)


def adapter_files(model: Any) -> dict[str, bytes]:
    """What peft's `save_pretrained(safe_serialization=True, save_embedding_layers=False)` writes, made in
    memory: adapter_model.safetensors and adapter_config.json.  Only the LoRA weights: the engine
    (gateway/engine/local/lora.py) refuses anything else.  (peft 0.21's steps; a unit test holds the two
    byte-for-byte equal.)"""
    from peft import get_peft_model_state_dict
    from peft.utils.other import id_tensor_storage
    from safetensors.torch import save

    weights = get_peft_model_state_dict(model, save_embedding_layers=False)
    seen: set[Any] = set()
    for name, tensor in weights.items():
        storage = id_tensor_storage(tensor)
        if storage in seen:  # safetensors refuses aliased tensors: peft clones the second one
            tensor = tensor.clone()
        seen.add(storage)
        weights[name] = tensor.contiguous()
    # The config as save_pretrained writes it, from the live object as peft does (a copy could list the
    # target_modules set in another order), put back as it was afterwards.
    config = model.peft_config["default"]
    saved = config.base_model_name_or_path, config.inference_mode
    try:
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = model.base_model.model.__dict__.get("name_or_path", None) or None
        config.inference_mode = True
        settings = {k: list(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    finally:
        config.base_model_name_or_path, config.inference_mode = saved
    return {
        "adapter_model.safetensors": save(weights, metadata={"format": "pt"}),
        "adapter_config.json": json.dumps(settings, indent=2, sort_keys=True).encode(),
    }


def write_sealed(sealer: Sealer, data: bytes | memoryview, path: Path) -> None:
    """`data` into `path` through the sealer (encrypted when encryption at rest is on), atomically, 0600."""
    view = memoryview(data)
    sealer.encrypt_stream((bytes(view[i : i + _PIECE]) for i in range(0, len(view), _PIECE)), path)


def read_sealed(sealer: Sealer, path: Path) -> bytes:
    """The whole plaintext of a file `write_sealed` wrote, in memory; a tampered or cut file raises."""
    return b"".join(sealer.open_decrypted(path))


def fingerprint(config: TrainConfig) -> str:
    """What fixes the loss curve: a checkpoint resumes only a run with the same fingerprint.

    Content, never place: the base model counts by contracts.base_models.model_identity and the training data
    by its bytes, not by their paths, so a worker that mounts the data dir elsewhere (or finds it moved)
    still resumes a job from its checkpoints.
    """
    settings = asdict(config)
    for name in (*_NOT_FINGERPRINTED, "base_model_path", "training_file"):
        settings.pop(name)
    settings["base_model"] = model_identity(config.base_model_path)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    with config.training_file.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def complete_checkpoints(output_dir: Path) -> list[Path]:
    found = [path for path in (output_dir / "checkpoints").glob("step-*") if _is_complete(path)]
    return sorted(found, key=lambda path: int(path.name.removeprefix("step-")))


def prune_checkpoints(output_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (0 keeps all); returns what was deleted.  The
    newest is never deleted, so resuming always has one; each is deleted only after the next is complete."""
    if keep <= 0:
        return []
    old = complete_checkpoints(output_dir)[:-keep]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def _is_complete(path: Path) -> bool:
    return path.name.removeprefix("step-").isdigit() and all(
        (path / name).is_file() for name in (*_ADAPTER_FILES, _STATE_JSON, _STATE_TENSORS)
    )


def write_dir_atomically(target: Path, fill: Callable[[Path], None]) -> None:
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
        remove_staging(parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_staging(directory: Path) -> None:
    """Staging dirs are the run's only temporary files; a crash may leave some, so sweep on start and end."""
    for parent in (directory, directory / "checkpoints"):
        if parent.is_dir():
            for stale in parent.glob(".*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
