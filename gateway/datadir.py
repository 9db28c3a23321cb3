"""The data directory: everything the service writes, private to its user (dirs 0700, files 0600)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ensure_private_dir", "restrict_umask"]


def restrict_umask() -> None:
    """New files 0600 and directories 0700 by default, for this process and its children."""
    os.umask(0o077)


def ensure_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path
