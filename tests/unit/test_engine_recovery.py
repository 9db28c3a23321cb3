"""The engine survives its own failures: a failed step fails only what was running, repeated failures rebuild
the runner on the engine thread, and an engine that cannot be rebuilt says so instead of hanging callers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from gateway.core.errors import EngineFailure, EngineUnavailable
from gateway.engine.local import scheduler as scheduler_module
from gateway.engine.local.engine import LocalEngine
from gateway.engine.local.scheduler import MAX_FAILED_STEPS
from tests.unit.tiny_engine import collect, request

EngineFactory = Callable[..., LocalEngine]


def _greedy(text: str = "Hello there", tokens: int = 8) -> Any:
    return request(text, max_tokens=tokens, temperature=0, ignore_eos=True)


def _wait_until_idle(engine: LocalEngine) -> None:
    deadline = time.monotonic() + 30
    while engine.stats().running:
        assert time.monotonic() < deadline, "sequences still running"
        time.sleep(0.01)


def _failing_steps(engine: LocalEngine, failures: int) -> list[int]:
    """Make the runner's next `failures` steps raise; returns a list that counts the failed calls."""
    runner = engine._scheduler.runner  # type: ignore[union-attr]
    real = runner.step
    failed: list[int] = []

    def step(batch: Any) -> Any:
        if len(failed) < failures:
            failed.append(1)
            raise RuntimeError("injected step failure")
        return real(batch)

    runner.step = step  # type: ignore[method-assign]
    return failed


def test_a_long_prompt_then_three_concurrent_requests(engine_factory: EngineFactory) -> None:
    """The issue's sequence: the first long prompt grows the KV cache inside a step, then sequences that
    finish out of slot order compact the cache.  This took the engine down for good."""
    engine = engine_factory(max_model_len=2048)

    async def scenario() -> list[dict[int, str]]:
        first = await collect(engine, _greedy("word " * 1500, 4))
        assert first[1] == {0: "length"}
        together = await asyncio.gather(*(collect(engine, _greedy("hi", n)) for n in (5, 40, 60)))
        return [finish for _, finish, _ in together]

    assert asyncio.run(scenario()) == [{0: "length"}] * 3
    _wait_until_idle(engine)  # the last delta reaches the caller a moment before its slot is freed
    assert engine.is_ready() and engine.stats().failed_steps == 0


def test_a_failed_step_fails_the_running_requests_and_the_engine_serves_on(
    engine_factory: EngineFactory,
) -> None:
    engine = engine_factory(max_running=1)

    async def scenario() -> tuple[BaseException | None, tuple[Any, ...]]:
        running = await engine.submit(_greedy(tokens=50))
        chunks = aiter(running)
        await anext(chunks)  # it holds the only slot now
        waiting = asyncio.create_task(collect(engine, _greedy(tokens=3)))  # queued behind it
        await asyncio.sleep(0.05)
        _failing_steps(engine, 1)
        error: BaseException | None = None
        try:
            async for _ in chunks:
                pass
        except EngineFailure as exc:
            error = exc
        return error, await waiting

    error, waited = asyncio.run(scenario())
    assert isinstance(error, EngineFailure) and error.status_code == 500
    assert "injected" not in error.message and "RuntimeError" not in error.message  # no internals
    assert waited[1] == {0: "length"}  # the queued request was not running, so it is served
    _wait_until_idle(engine)
    stats = engine.stats()
    assert stats.failed_steps == 1 and stats.restarts == 0 and stats.queued == 0
    assert engine.is_ready() and asyncio.run(collect(engine, _greedy(tokens=2)))[2] == 2


def test_an_error_while_recovering_does_not_kill_the_engine_thread(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_factory()

    async def scenario() -> None:
        stream = await engine.submit(_greedy(tokens=50))
        chunks = aiter(stream)
        await anext(chunks)
        real_send = scheduler_module.Group.send

        def send(group: Any, item: Any) -> None:
            if isinstance(item, BaseException):
                raise RuntimeError("the caller's loop broke while we told it")
            real_send(group, item)

        monkeypatch.setattr(scheduler_module.Group, "send", send)
        _failing_steps(engine, 1)
        for _ in range(200):
            if engine.stats().failed_steps:
                break
            await asyncio.sleep(0.01)
        monkeypatch.setattr(scheduler_module.Group, "send", real_send)
        await stream.aclose()

    asyncio.run(scenario())
    assert engine.stats().failed_steps == 1 and engine.is_ready()
    assert asyncio.run(collect(engine, _greedy(tokens=3)))[2] == 3


async def _fail_in_a_row(engine: LocalEngine, times: int) -> None:
    """One request per failing step, one after the other (a step fails every request it was running)."""
    for _ in range(times):
        with pytest.raises(EngineFailure):
            await collect(engine, _greedy(tokens=4))


def test_failures_in_a_row_rebuild_the_runner_and_queued_requests_are_served(
    engine_factory: EngineFactory,
) -> None:
    engine = engine_factory()
    old_runner = engine._scheduler.runner  # type: ignore[union-attr]
    failed = _failing_steps(engine, MAX_FAILED_STEPS)

    async def scenario() -> Any:
        await _fail_in_a_row(engine, MAX_FAILED_STEPS)
        return await collect(engine, _greedy(tokens=4))  # queued while the runner is rebuilt

    assert asyncio.run(scenario())[1] == {0: "length"}
    assert len(failed) == MAX_FAILED_STEPS
    assert engine._scheduler.runner is not old_runner  # type: ignore[union-attr]
    assert engine.stats().restarts == 1 and engine.is_ready() and not engine.is_failed()
    assert asyncio.run(collect(engine, _greedy(tokens=3)))[2] == 3


def test_an_engine_that_cannot_be_rebuilt_fails_every_caller_and_says_so(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.engine.local import engine as local

    monkeypatch.setattr(local, "REBUILD_BACKOFF_SECONDS", 0.01)
    engine = engine_factory()

    def no_model(model_dir: Any) -> Any:
        raise OSError("the model directory is gone")

    monkeypatch.setattr(engine, "_build_runner", no_model)
    _failing_steps(engine, MAX_FAILED_STEPS)

    async def scenario() -> BaseException | None:
        await _fail_in_a_row(engine, MAX_FAILED_STEPS)
        try:  # queued while the rebuild is tried: failed when it gives up, or refused at once after
            await collect(engine, _greedy(tokens=4))
        except EngineUnavailable as exc:
            return exc
        return None

    assert isinstance(asyncio.run(scenario()), EngineUnavailable)
    assert engine.is_failed() and not engine.is_ready()
    with pytest.raises(EngineUnavailable):
        asyncio.run(collect(engine, _greedy(tokens=2)))


def test_shutdown_fails_queued_requests_instead_of_leaving_them_waiting(
    engine_factory: EngineFactory,
) -> None:
    engine = engine_factory(max_running=1)

    async def scenario() -> list[Any]:
        tasks = [asyncio.create_task(collect(engine, _greedy(tokens=200))) for _ in range(3)]
        await asyncio.sleep(0.1)
        await asyncio.to_thread(engine.shutdown)
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)

    results = asyncio.run(scenario())
    assert all(isinstance(r, EngineUnavailable) for r in results)
    assert engine.stats().queued == 0
