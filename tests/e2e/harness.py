"""A real gateway for end-to-end tests: `gateway serve` in a subprocess, over HTTPS with a fresh dev CA."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from gateway.auth.keys import ensure_dev_keys
from gateway.auth.tokens import mint_dev_token
from gateway.core.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "spec" / "openai-openapi.yaml"  # vendored: spec/README.md


def non_json_lines(text: str) -> list[str]:
    """Log lines that are not one JSON object each (the logs promise nothing else)."""
    bad = []
    for line in text.splitlines():
        try:
            if not isinstance(json.loads(line), dict):
                bad.append(line)
        except ValueError:
            bad.append(line)
    return bad


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_certs(out: Path) -> None:
    sys.path.insert(0, str(REPO / "certs"))
    try:
        from make_dev_certs import make_certs as _make
    finally:
        sys.path.pop(0)
    _make(out)


@dataclass
class Gateway:
    data_dir: Path
    certs: Path
    model_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def ca(self) -> str:
        return str(self.certs / "ca.pem")

    def verify(self) -> ssl.SSLContext:
        """Trust exactly the dev CA this gateway's certificate was made with."""
        return ssl.create_default_context(cafile=self.ca)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(
            {
                "GATEWAY_DATA_DIR": str(self.data_dir),
                "GATEWAY_SERVER__PORT": str(self.port),
                "GATEWAY_SERVER__TLS_CERT": str(self.certs / "server.pem"),
                "GATEWAY_SERVER__TLS_KEY": str(self.certs / "server-key.pem"),
                # the converted default model, shared by every server in the session
                "GATEWAY_MODELS__BASE": f'{{"smollm2-135m-instruct": "{self.model_dir}"}}',
                "GATEWAY_ENGINE__THREADS": "2",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def settings(self) -> Settings:
        return load_settings(env=self.env())

    def token(self, scope: str = "chat models:read", *, sub: str = "tester", org: str | None = "acme") -> str:
        return mint_dev_token(self.settings(), sub=sub, org=org, scope=scope, ttl_seconds=3600)

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, verify=self.verify(), headers=headers, timeout=120)

    def start(self, *args: str, timeout: float = 180) -> None:
        ensure_dev_keys(self.settings())
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", *args],
            env=self.env(),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        with httpx.Client(verify=self.verify(), timeout=5) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"gateway exited with {self.process.returncode}:\n{self.logs()[-4000:]}"
                    )
                try:
                    if client.get(f"{self.url}/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.3)
        raise RuntimeError(f"gateway not ready after {timeout}s:\n{self.logs()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def worker_pid(self) -> int | None:
        """The fine-tuning worker `gateway serve` started (a child process running finetune.worker)."""
        assert self.process is not None
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                if b"finetune.worker" in cmdline:
                    return int(child)
        return None

    def metric(self, name: str) -> float:
        """One unlabelled (or first-labelled) sample of the loopback /metrics scrape."""
        with self.client() as http:
            for line in http.get("/metrics").text.splitlines():
                if line.startswith(name) and line[len(name)] in " {":
                    return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


def running(gateway: Gateway, *args: str) -> Iterator[Gateway]:
    gateway.start(*args)
    try:
        yield gateway
    finally:
        gateway.stop()
