"""How big the engine's batch, prefill step, queue and per-tenant share are on this machine: a pure function
of the model's shape, the memory free at start-up and the cores (`size_engine`), plus the two readers that
measure the machine (`host_memory_available`, `usable_cores`, both cgroup aware).  torch-free.

The local engine keeps one KV-cache slot per running sequence, each as long as `max_model_len`:

    kv bytes / token  = 2 (K and V) x layers x kv_heads x head_dim x dtype bytes
    kv cache bytes    = max_running x max_model_len x kv bytes / token
    kv budget         = (memory free at start-up - weights - activations of one full step) x memory_fraction

`auto` values:
    max_running           min(what the KV budget holds, what the device keeps busy: 32 per core on a CPU,
                          where a 2-core machine measured 298 tok/s at 16 and ~575 at 64 in flight, 256 on
                          a GPU, vLLM's max_num_seqs)
    prefill_token_budget  512 per core on a CPU (1024 on 2 cores, the measured default), 512..4096; 4096 on
                          a GPU
    max_queued            4 x max_running (the ratio of the old fixed defaults, 16 / 64)
    tenant_concurrency    2 x max_running: one tenant may fill the batch and as much again waiting, never
                          the whole queue

A configured value is kept as given, but one whose KV cache cannot fit the budget is a start-up error
(SizingError) naming the numbers, never an out-of-memory later under load.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gateway.core.errors import EngineFailure

__all__ = [
    "EngineSizing",
    "Machine",
    "ModelShape",
    "Requested",
    "SizingError",
    "host_memory_available",
    "size_engine",
    "usable_cores",
]

GPU_MAX_RUNNING = 256
CPU_RUNNING_PER_CORE = 32
CPU_PREFILL_PER_CORE = 512
GPU_PREFILL_BUDGET = 4096
QUEUE_PER_RUNNING = 4
TENANT_PER_RUNNING = 2
_QUANTIZED_BYTES_PER_PARAM = {"int4": 0.625, "int8": 1.0}  # packed weights + scales (and zeros)


class SizingError(EngineFailure):
    """The configured engine cannot fit this machine's memory; raised at start-up."""

    default_code = "engine_memory"


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    dtype_bytes: int  # of the engine's weights and KV cache (2 for bf16/fp16, 4 for fp32)

    @classmethod
    def from_config(cls, config: Any, dtype_bytes: int) -> ModelShape:
        """From a transformers config (or a config.json dict) of a Llama-family model."""

        def get(name: str, default: Any = None) -> Any:
            return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)

        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        return cls(
            layers=int(get("num_hidden_layers")),
            hidden=hidden,
            intermediate=int(get("intermediate_size")),
            heads=heads,
            kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            vocab=int(get("vocab_size")),
            tied_embeddings=bool(get("tie_word_embeddings", False)),
            dtype_bytes=dtype_bytes,
        )

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def linear_params(self) -> int:
        """Parameters of the projections (what a quantized copy duplicates)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.intermediate
        return self.layers * per_layer

    @property
    def weight_bytes(self) -> int:
        """The runner's copy of the weights (norms are fp32, and few)."""
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        norms = (2 * self.layers + 1) * self.hidden * 4
        return (self.linear_params + embeddings) * self.dtype_bytes + norms

    def step_activation_bytes(self, tokens: int, logit_rows: int) -> int:
        """A generous bound on one step's temporaries: the fp32 residual stream and its norms, the fused
        projections' outputs, and fp32 logits (with sampling's copies) for the rows that want them."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_token = 6 * self.hidden * 4 + (q + 2 * kv) * 4 + 3 * self.intermediate * self.dtype_bytes
        return tokens * per_token + logit_rows * self.vocab * 12


@dataclass(frozen=True)
class Machine:
    device: str  # "cpu" or "cuda"
    memory_bytes: int  # free for this engine at start-up, before its weights are loaded
    cores: int


@dataclass(frozen=True)
class Requested:
    """The configuration; None = auto."""

    max_model_len: int
    max_running: int | None = None
    max_queued: int | None = None
    prefill_token_budget: int | None = None
    tenant_concurrency: int | None = None
    memory_fraction: float = 0.5
    quantization: str | None = None  # "int4" / "int8": the decode copy the runner adds to its weights


@dataclass(frozen=True)
class EngineSizing:
    device: str
    max_running: int
    max_queued: int
    prefill_token_budget: int
    tenant_concurrency: int
    max_model_len: int
    kv_bytes_per_token: int
    kv_cache_bytes: int  # the KV cache at full length for every slot
    kv_budget_bytes: int
    weight_bytes: int
    memory_bytes: int
    cores: int
    auto: tuple[str, ...]  # which values were sized here (the rest were configured)

    @property
    def kv_cache_tokens(self) -> int:
        return self.max_running * self.max_model_len

    def log_fields(self) -> dict[str, Any]:
        fields = asdict(self)
        fields["auto"] = ",".join(self.auto) or "none"
        fields["kv_cache_tokens"] = self.kv_cache_tokens
        return fields


def size_engine(shape: ModelShape, machine: Machine, requested: Requested) -> EngineSizing:
    """The engine's sizes on `machine` (see the module docstring); SizingError when they cannot fit."""
    if not 0 < requested.memory_fraction <= 1:
        raise SizingError(f"engine.memory_fraction must be in (0, 1], not {requested.memory_fraction}")
    gpu = machine.device == "cuda"
    cores = max(1, machine.cores)
    auto: list[str] = []

    prefill = requested.prefill_token_budget
    if prefill is None:
        auto.append("prefill_token_budget")
        prefill = GPU_PREFILL_BUDGET if gpu else min(4096, max(512, CPU_PREFILL_PER_CORE * cores))
    if prefill < 1:
        raise SizingError(f"engine.prefill_token_budget must be at least 1, not {prefill}")

    weights = shape.weight_bytes
    if requested.quantization in _QUANTIZED_BYTES_PER_PARAM:
        weights += int(shape.linear_params * _QUANTIZED_BYTES_PER_PARAM[requested.quantization])
    compute_cap = GPU_MAX_RUNNING if gpu else min(GPU_MAX_RUNNING, CPU_RUNNING_PER_CORE * cores)
    rows_bound = requested.max_running or compute_cap
    activations = shape.step_activation_bytes(prefill + rows_bound, rows_bound + 8)
    left = machine.memory_bytes - weights - activations
    mib = 1 << 20
    if left <= 0:
        raise SizingError(
            f"the model needs {weights // mib} MiB of weights and {activations // mib} MiB for one step on "
            f"the {machine.device}, which has {machine.memory_bytes // mib} MiB free: use a smaller model or "
            "lower engine.prefill_token_budget"
        )
    budget = int(left * requested.memory_fraction)
    per_slot = requested.max_model_len * shape.kv_bytes_per_token
    fits = budget // per_slot

    running = requested.max_running
    if running is not None and running < 1:
        raise SizingError(f"engine.max_running must be at least 1, not {running}")
    if running is None:
        auto.append("max_running")
        running = min(compute_cap, fits)
    if running < 1 or running > fits:
        running = max(running, 1)
        raise SizingError(
            f"the KV cache for engine.max_running={running} x models.max_model_len="
            f"{requested.max_model_len} needs {running * per_slot // mib} MiB; "
            f"{budget // mib} MiB may be used "
            f"({requested.memory_fraction:g} of {left // mib} MiB free after the weights on the "
            f"{machine.device}): lower models.max_model_len or engine.max_running, or raise "
            "engine.memory_fraction"
        )

    queued = requested.max_queued
    if queued is None:
        auto.append("max_queued")
        queued = QUEUE_PER_RUNNING * running
    tenant = requested.tenant_concurrency
    if tenant is None:
        auto.append("tenant_concurrency")
        tenant = TENANT_PER_RUNNING * running
    return EngineSizing(
        device=machine.device,
        max_running=running,
        max_queued=queued,
        prefill_token_budget=prefill,
        tenant_concurrency=tenant,
        max_model_len=requested.max_model_len,
        kv_bytes_per_token=shape.kv_bytes_per_token,
        kv_cache_bytes=running * per_slot,
        kv_budget_bytes=budget,
        weight_bytes=weights,
        memory_bytes=machine.memory_bytes,
        cores=cores,
        auto=tuple(auto),
    )


# -- measuring the machine ---------------------------------------------------------------------------------


def host_memory_available(
    meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")
) -> int:
    """Bytes this process may still take: the kernel's MemAvailable, lowered to what is left under the
    cgroup's limit (v2 memory.max - memory.current, or v1 limit_in_bytes - usage_in_bytes) in a container."""
    available = _meminfo_available(meminfo)
    for limit_file, usage_file in (
        (cgroup / "memory.max", cgroup / "memory.current"),
        (cgroup / "memory" / "memory.limit_in_bytes", cgroup / "memory" / "memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 writes ~2^63 for "none"
            available = min(available, max(0, limit - usage))
            break
    return available


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup"), threads: int = 0) -> int:
    """Cores this process may use: engine.threads when set, else its CPU affinity, lowered to the cgroup's
    CPU quota (v2 cpu.max "quota period", or v1 cfs_quota_us / cfs_period_us)."""
    if threads > 0:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota: tuple[int, int] | None = None
    try:
        parts = (cgroup / "cpu.max").read_text().split()
        if len(parts) == 2 and parts[0] != "max":
            quota = int(parts[0]), int(parts[1])
    except (OSError, ValueError):
        q, p = _read_int(cgroup / "cpu" / "cpu.cfs_quota_us"), _read_int(cgroup / "cpu" / "cpu.cfs_period_us")
        if q is not None and p and q > 0:
            quota = q, p
    if quota is not None and quota[1] > 0:
        cores = min(cores, max(1, math.ceil(quota[0] / quota[1])))
    return max(1, cores)


def _meminfo_available(meminfo: Path) -> int:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62  # unknown: the cgroup, if any, bounds it


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return None  # "max": no limit
