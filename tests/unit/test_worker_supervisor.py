"""The worker process `gateway serve` runs is restarted when it dies, with a backoff, and stopped with it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import structlog.testing

from gateway.core.worker_supervisor import WorkerSupervisor
from gateway.observability.metrics import GatewayMetrics

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


async def _until(condition) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + 30
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_killed_worker_is_started_again_and_stopped_with_the_gateway() -> None:
    async def scenario() -> None:
        supervisor = WorkerSupervisor(SLEEPER, backoff_seconds=0.05)
        metrics = GatewayMetrics(worker=supervisor, process=False)
        supervisor.start()
        await _until(lambda: supervisor.up)
        first = supervisor.pid
        assert first is not None
        assert b"gateway_finetune_worker_up 1.0" in metrics.render()[0]
        os.kill(first, signal.SIGKILL)
        await _until(lambda: not supervisor.up)
        assert b"gateway_finetune_worker_up 0.0" in metrics.render()[0]
        await _until(lambda: supervisor.up and supervisor.pid != first)
        assert supervisor.restarts == 1
        assert b"gateway_finetune_worker_restarts_total 1.0" in metrics.render()[0]
        second = supervisor.pid
        assert second is not None
        await supervisor.stop()
        assert not supervisor.up and not _alive(second)

    asyncio.run(scenario())


def test_the_backoff_doubles_while_the_worker_keeps_dying_and_each_restart_is_logged() -> None:
    async def scenario() -> None:
        supervisor = WorkerSupervisor([sys.executable, "-c", "raise SystemExit(3)"], backoff_seconds=0.05)
        supervisor.start()
        try:
            await _until(lambda: supervisor.restarts >= 3)
        finally:
            await supervisor.stop()

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())
    exits = [e["returncode"] for e in logs if e["event"] == "worker.process_exited"]
    delays = [e["in_seconds"] for e in logs if e["event"] == "worker.restarting"]
    assert exits[:3] == [3, 3, 3]
    assert delays[:3] == [0.05, 0.1, 0.2]


def test_stop_kills_a_worker_that_ignores_sigterm() -> None:
    stubborn = [
        sys.executable,
        "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
        "time.sleep(120)",
    ]

    async def scenario() -> None:
        supervisor = WorkerSupervisor(stubborn, stop_timeout=0.5)
        supervisor.start()
        await _until(lambda: supervisor.up)
        await asyncio.sleep(0.5)  # let it install the handler
        pid = supervisor.pid
        assert pid is not None
        await supervisor.stop()
        assert not _alive(pid)

    asyncio.run(scenario())
