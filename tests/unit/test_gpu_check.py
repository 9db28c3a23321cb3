"""`make gpu-check` on a machine without a GPU: it says so plainly and exits 0 (3 when a GPU is required)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _gpu_check(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))  # no GPU, even on a GPU machine
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_without_a_gpu_it_says_so_and_succeeds() -> None:
    before = (REPO / "bench" / "RESULTS.md").read_text()
    result = _gpu_check()
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU here" in result.stdout and "nothing run" in result.stdout
    assert (REPO / "bench" / "RESULTS.md").read_text() == before  # no table of made-up numbers


def test_without_a_gpu_require_gpu_fails_with_its_own_code() -> None:
    result = _gpu_check("--require-gpu")
    assert result.returncode == 3
    assert "no CUDA GPU here" in result.stdout
