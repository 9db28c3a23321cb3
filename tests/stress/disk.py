"""A data dir on a size-limited tmpfs that fills up, and is freed again.

`mount -t tmpfs` needs root (or CAP_SYS_ADMIN); where it is refused the test skips and says so.
"""

from __future__ import annotations

import contextlib
import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

__all__ = ["fill", "small_filesystem"]


@contextlib.contextmanager
def small_filesystem(mount_point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at `mount_point`; raises PermissionError (with mount's message) where not allowed."""
    mount_point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise PermissionError(f"mount -t tmpfs refused: {done.stderr.strip() or done.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)


def fill(path: Path) -> int:
    """Write `path` until the filesystem is full (to the last 4 KiB); returns the bytes written."""
    written = 0
    with path.open("wb", buffering=0) as out:
        for block in (1 << 20, 1 << 12, 1 << 9):
            chunk = b"\0" * block
            while True:
                try:
                    written += out.write(chunk) or 0
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return written
