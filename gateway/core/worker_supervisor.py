"""The fine-tuning worker that `gateway serve` starts, kept running.

The worker is a child process (it owns the training device, and a crash there never takes the gateway down).
When it exits without being asked to (killed, out of memory, a bug), it is started again after a backoff that
doubles from 1 s to a minute and resets once a worker has stayed up for a minute.  The new worker takes its
predecessor's host slot and so its worker id, and reclaims the interrupted job at once (finetune/lease.py):
the job resumes from its last checkpoint instead of reading `running` forever.  Every exit and restart is
logged; `up` and `restarts` feed /readyz and /metrics.

The child is started from the event loop's thread (the main thread under uvicorn), which lives as long as the
gateway: the worker asks the kernel for SIGTERM when the thread that forked it dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

import structlog

__all__ = ["WorkerSupervisor"]

log = structlog.get_logger(__name__)


class WorkerSupervisor:
    def __init__(
        self,
        command: Sequence[str],
        *,
        backoff_seconds: float = 1.0,
        max_backoff_seconds: float = 60.0,
        stable_seconds: float = 60.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self.command = list(command)
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.stable_seconds = stable_seconds
        self.stop_timeout = stop_timeout
        self.restarts = 0
        self.pid: int | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def up(self) -> bool:
        return self._process is not None and self._process.returncode is None

    def start(self) -> None:
        """Start supervising (from the event loop)."""
        self._task = asyncio.create_task(self._supervise(), name="worker-supervisor")

    async def _supervise(self) -> None:
        delay = self.backoff_seconds
        while not self._stopping:
            started = time.monotonic()
            try:
                self._process = await asyncio.create_subprocess_exec(*self.command)
            except OSError as exc:
                log.error("worker.start_failed", error_type=type(exc).__name__)
            else:
                self.pid = self._process.pid
                log.info("worker.process_started", pid=self.pid, restarts=self.restarts)
                code = await self._process.wait()
                if self._stopping:
                    return
                log.error("worker.process_exited", pid=self.pid, returncode=code)
            if time.monotonic() - started >= self.stable_seconds:
                delay = self.backoff_seconds
            log.warning("worker.restarting", in_seconds=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff_seconds)
            self.restarts += 1

    async def stop(self) -> None:
        """SIGTERM: the worker hands its job back (to resume from its last checkpoint); kill if it hangs."""
        self._stopping = True
        if self._task is not None:  # first, so no new worker starts while this one stops
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        process = self._process
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), self.stop_timeout)
            except TimeoutError:
                process.kill()
                await process.wait()
