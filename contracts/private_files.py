"""Owner-only directories and files, written atomically and durably.

Keys, the audit head and encrypted blobs all need the same three things: a parent directory only the service
user can enter (0700), files only it can read (0600), and a write that is either wholly there or not there at
all after a crash (temp file in the same directory, fsync, rename, fsync the directory).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["ensure_private_dir", "fsync_dir", "private_file_writer", "restrict_umask", "write_private_file"]

PRIVATE_DIR_MODE = 0o700


def restrict_umask() -> None:
    """New files 0600 and directories 0700 by default, for this process and the workers it starts."""
    os.umask(0o077)


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) if needed and make sure only the owner can enter it."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    # mkdir's mode is filtered by the umask and ignored for existing dirs, so set it explicitly.
    os.chmod(path, PRIVATE_DIR_MODE)
    return path


def fsync_dir(path: Path) -> None:
    """Persist a directory entry change (create, rename) so it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def private_file_writer(path: Path, *, exclusive: bool = False) -> Iterator[BinaryIO]:
    """Stream into a temp file beside `path`; on a clean exit it becomes `path` (0600) atomically.

    On an exception nothing appears at `path`.  exclusive=True never replaces an existing file (used for keys:
    two processes starting at once must not each make a key and overwrite the other's); it raises
    FileExistsError instead.
    """
    parent = ensure_private_dir(path.parent)
    # mkstemp creates the file 0600 and never follows or reuses an existing name.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            os.link(tmp, path)  # unlike rename(), fails if the target exists
        else:
            os.replace(tmp, path)
        fsync_dir(parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_private_file(path: Path, data: bytes, *, exclusive: bool = False) -> bool:
    """Atomically write `data` to `path` (0600, in a 0700 dir). False when `exclusive` and it existed."""
    try:
        with private_file_writer(path, exclusive=exclusive) as fh:
            fh.write(data)
    except FileExistsError:
        if exclusive:
            return False
        raise
    return True
