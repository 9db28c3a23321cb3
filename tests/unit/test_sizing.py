"""Engine sizing at start-up (gateway/engine/local/sizing.py): a pure function of the model shape, memory
and the cores, and the cgroup-aware readers of the machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.core.settings import load_settings
from gateway.engine.local.sizing import (
    Machine,
    ModelShape,
    Requested,
    SizingError,
    host_memory_available,
    size_engine,
    usable_cores,
)

GiB = 1 << 30

# SmolLM2-135M's and Qwen2.5-7B's config.json (what bench/gpu_check.py serves with random weights)
CONFIGS = Path(__file__).resolve().parents[2] / "bench" / "configs"
SMOLLM2 = json.loads((CONFIGS / "smollm2-135m.json").read_text())
QWEN7B = json.loads((CONFIGS / "qwen2.5-7b.json").read_text())


def test_kv_bytes_per_token_follow_layers_heads_head_dim_and_dtype() -> None:
    smol = ModelShape.from_config(SMOLLM2, dtype_bytes=2)
    assert smol.head_dim == 64
    assert smol.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2  # 23,040: K and V, every layer, bf16
    assert ModelShape.from_config(SMOLLM2, dtype_bytes=4).kv_bytes_per_token == 2 * smol.kv_bytes_per_token
    qwen = ModelShape.from_config(QWEN7B, dtype_bytes=2)
    assert qwen.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2
    # the weight estimate lands on the published parameter counts (135M tied, 7.6B untied)
    assert 130e6 < smol.weight_bytes / 2 < 140e6
    assert 7.5e9 < qwen.weight_bytes / 2 < 7.7e9


def test_auto_on_a_two_core_cpu_is_what_the_bench_measured_best() -> None:
    shape = ModelShape.from_config(SMOLLM2, dtype_bytes=2)
    sizing = size_engine(shape, Machine("cpu", 16 * GiB, 2), Requested(max_model_len=2048))
    assert sizing.max_running == 64  # 32 per core: the compute cap, memory holds far more
    assert sizing.prefill_token_budget == 1024
    assert sizing.max_queued == 4 * 64
    assert sizing.tenant_concurrency == 2 * 64
    assert sizing.kv_cache_bytes == 64 * 2048 * shape.kv_bytes_per_token
    assert sizing.kv_cache_bytes <= sizing.kv_budget_bytes
    assert set(sizing.auto) == {"max_running", "max_queued", "prefill_token_budget", "tenant_concurrency"}


def test_more_cores_more_rows_until_memory_caps_them() -> None:
    shape = ModelShape.from_config(SMOLLM2, dtype_bytes=2)
    big = size_engine(shape, Machine("cpu", 64 * GiB, 8), Requested(max_model_len=2048))
    assert big.max_running == 256 and big.prefill_token_budget == 4096
    # 2 GiB free: (2 GiB - weights - a step) / 2 holds fewer slots than 8 cores would keep busy
    small = size_engine(shape, Machine("cpu", 2 * GiB, 8), Requested(max_model_len=2048))
    per_slot = 2048 * shape.kv_bytes_per_token
    assert 1 <= small.max_running < 256
    assert small.max_running == small.kv_budget_bytes // per_slot
    assert small.kv_cache_bytes <= small.kv_budget_bytes
    # a shorter context fits more slots in the same memory
    short = size_engine(shape, Machine("cpu", 2 * GiB, 8), Requested(max_model_len=512))
    assert short.max_running > small.max_running


def test_a_7b_on_a_gpu() -> None:
    shape = ModelShape.from_config(QWEN7B, dtype_bytes=2)
    sizing = size_engine(shape, Machine("cuda", 140 * GiB, 16), Requested(max_model_len=4096))
    assert sizing.max_running == 256 and sizing.prefill_token_budget == 4096
    on_24gb = size_engine(shape, Machine("cuda", 23 * GiB, 16), Requested(max_model_len=4096))
    assert 1 <= on_24gb.max_running < 40  # ~7.5 GiB left after 15 GiB of weights, half of it for the cache
    assert on_24gb.kv_cache_bytes <= on_24gb.kv_budget_bytes


def test_configured_values_are_kept_and_checked() -> None:
    shape = ModelShape.from_config(SMOLLM2, dtype_bytes=2)
    requested = Requested(
        max_model_len=2048, max_running=8, max_queued=10, prefill_token_budget=256, tenant_concurrency=3
    )
    sizing = size_engine(shape, Machine("cpu", 16 * GiB, 2), requested)
    assert (sizing.max_running, sizing.max_queued, sizing.prefill_token_budget) == (8, 10, 256)
    assert sizing.tenant_concurrency == 3 and sizing.auto == ()
    with pytest.raises(SizingError, match=r"max_running=512 x models\.max_model_len=2048 needs"):
        size_engine(shape, Machine("cpu", 4 * GiB, 2), Requested(max_model_len=2048, max_running=512))
    with pytest.raises(SizingError, match="at least 1"):
        size_engine(shape, Machine("cpu", 4 * GiB, 2), Requested(max_model_len=2048, max_running=0))


def test_a_model_that_does_not_fit_is_a_start_up_error() -> None:
    qwen = ModelShape.from_config(QWEN7B, dtype_bytes=2)
    with pytest.raises(SizingError, match="MiB of weights"):
        size_engine(qwen, Machine("cuda", 8 * GiB, 16), Requested(max_model_len=2048))
    # weights fit, but not one slot of the context asked for
    smol = ModelShape.from_config(SMOLLM2, dtype_bytes=4)
    free = smol.weight_bytes + smol.step_activation_bytes(1024 + 64, 72) + 10 * (1 << 20)
    with pytest.raises(SizingError, match="KV cache"):
        size_engine(smol, Machine("cpu", free, 2), Requested(max_model_len=8192))


def test_the_quantized_copy_counts_against_memory() -> None:
    shape = ModelShape.from_config(SMOLLM2, dtype_bytes=2)
    plain = size_engine(shape, Machine("cpu", 16 * GiB, 2), Requested(max_model_len=2048))
    int4 = size_engine(shape, Machine("cpu", 16 * GiB, 2), Requested(max_model_len=2048, quantization="int4"))
    assert int4.weight_bytes > plain.weight_bytes
    assert int4.kv_budget_bytes < plain.kv_budget_bytes


def test_host_memory_is_the_lower_of_meminfo_and_the_cgroup(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   20000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert host_memory_available(meminfo, cgroup) == 20000000 * 1024  # no cgroup files: the kernel's figure
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text(str(GiB))
    assert host_memory_available(meminfo, cgroup) == 20000000 * 1024  # v2 without a limit
    (cgroup / "memory.max").write_text(str(4 * GiB))
    assert host_memory_available(meminfo, cgroup) == 3 * GiB  # limit - what the container uses already
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(2 * GiB))
    (v1 / "memory" / "memory.usage_in_bytes").write_text(str(GiB // 2))
    assert host_memory_available(meminfo, v1) == GiB + GiB // 2
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))  # v1's "no limit"
    assert host_memory_available(meminfo, v1) == 20000000 * 1024


def test_cores_follow_threads_then_the_cpu_quota(tmp_path: Path) -> None:
    assert usable_cores(tmp_path, threads=3) == 3
    assert usable_cores(tmp_path) >= 1
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs -> 2 threads' worth
    assert usable_cores(tmp_path) == min(2, usable_cores(tmp_path / "none"))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path) == usable_cores(tmp_path / "none")


def test_settings_take_auto_or_a_number() -> None:
    settings = load_settings(env={})
    assert settings.engine.max_running == "auto" and settings.limits.tenant_concurrency == "auto"
    settings = load_settings(
        env={"GATEWAY_ENGINE__MAX_RUNNING": "12", "GATEWAY_LIMITS__TENANT_CONCURRENCY": "0"}
    )
    assert settings.engine.max_running == 12 and settings.limits.tenant_concurrency == 0
    with pytest.raises(ValueError, match='must be "auto" or a whole number'):
        load_settings(env={"GATEWAY_ENGINE__PREFILL_TOKEN_BUDGET": "lots"})
    with pytest.raises(ValueError, match=r"engine\.device must be one of"):
        load_settings(env={"GATEWAY_ENGINE__DEVICE": "tpu"})


def test_an_engine_sizes_itself_at_start_up_and_reports_it(engine_factory: Any) -> None:
    engine = engine_factory(max_running=None, max_queued=None, prefill_token_budget=None)
    stats = engine.stats()
    assert engine.sizing is not None and "max_running" in engine.sizing.auto
    assert stats.max_running == engine.sizing.max_running >= 1
    assert stats.max_queued == 4 * stats.max_running
    assert stats.tenant_concurrency == 2 * stats.max_running
    assert stats.kv_cache_tokens == stats.max_running * engine.max_model_len
    assert stats.kv_cache_bytes == stats.kv_cache_tokens * engine.sizing.kv_bytes_per_token
    assert stats.prefill_token_budget == engine.sizing.prefill_token_budget


def test_an_engine_whose_cache_cannot_fit_refuses_to_start(engine_factory: Any) -> None:
    with pytest.raises(SizingError, match="KV cache"):
        engine_factory(max_running=4, memory_fraction=1e-9)


def test_the_factory_passes_auto_as_none_and_numbers_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.engine.factory import build_engine
    from gateway.engine.local.engine import LocalEngine

    monkeypatch.setattr(LocalEngine, "start", lambda self: None)  # the wiring only: no model is loaded
    settings = load_settings(env={})
    engine = build_engine(settings, settings.models.default)
    assert isinstance(engine, LocalEngine)
    requested = engine._requested
    assert requested.max_running is None and requested.max_queued is None
    assert requested.prefill_token_budget is None and requested.tenant_concurrency is None
    assert requested.memory_fraction == 0.5
    fixed = load_settings(
        env={"GATEWAY_ENGINE__MAX_RUNNING": "12", "GATEWAY_LIMITS__TENANT_CONCURRENCY": "5"}
    )
    engine = build_engine(fixed, fixed.models.default)
    assert isinstance(engine, LocalEngine)
    assert engine._requested.max_running == 12 and engine._requested.tenant_concurrency == 5


def test_the_tenant_limit_follows_the_sized_engine() -> None:
    """limits.tenant_concurrency = auto: create_app sets the limiter once an engine is sized."""
    from gateway.auth.limits import ConcurrencyLimiter
    from gateway.core.errors import RateLimited

    limiter = ConcurrencyLimiter(1)
    held = limiter.acquire("acme")
    with pytest.raises(RateLimited):
        limiter.acquire("acme")
    limiter.set_limit(2)  # what an engine sized for max_running = 1 suggests
    second = limiter.acquire("acme")
    assert limiter.limit == 2 and limiter.in_flight("acme") == 2  # the slot held before stays held
    held.release()
    second.release()
    assert limiter.in_flight("acme") == 0
