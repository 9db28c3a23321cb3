"""`make` finds a Python it can use (3.11, else 3.12) and says what it needs when there is none."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _fake_python(bin_dir: Path, name: str, works: bool) -> None:
    script = bin_dir / name
    body = f'exec {sys.executable} "$@"' if works else "exit 127"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)


def _make(tmp_path: Path, bin_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    return subprocess.run(
        ["make", *args, "install"],
        cwd=tmp_path,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_broken_python3_11_falls_back_to_python3_12(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_python(bin_dir, "python3.11", works=False)
    _fake_python(bin_dir, "python3.12", works=True)
    result = _make(tmp_path, bin_dir, "-n")
    assert "python3.12 -m venv .venv" in result.stdout, result.stdout + result.stderr


def test_with_no_usable_python_it_says_what_it_needs(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_python(bin_dir, "python3.11", works=False)
    result = _make(tmp_path, bin_dir)
    assert result.returncode != 0
    assert "make needs Python 3.11 or 3.12" in result.stdout + result.stderr
    assert not (tmp_path / ".venv").exists()
