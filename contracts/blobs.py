"""Blob storage: the bodies of stored files under `<data_dir>/files/`, written whole or not at all, private
(0600), and encrypted at rest when the data dir is (the cipher decides).

Both processes keep files here: the gateway the uploads, the worker the results file of a job.  Which files
exist and who owns them is the store's business (`files` rows); a blob is addressed by the path its row
holds, relative to the data dir.  The cipher is the data dir's (gateway.security.encryption); any object
with these methods will do, so this module imports nothing of either process.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from contracts.private_files import ensure_private_dir, fsync_dir

__all__ = ["BlobStorage", "Sealer"]


class Sealer(Protocol):
    """What blob storage needs of a cipher (a no-op one when encryption at rest is off)."""

    enabled: bool

    def encrypt_stream(self, src: BinaryIO | Iterable[bytes], dst_path: Path) -> int: ...

    def open_decrypted(self, path: Path) -> Iterator[bytes]: ...

    def decrypt_to(self, path: Path, dst_path: Path) -> int: ...


class BlobStorage:
    def __init__(self, cipher: Sealer, data_dir: Path) -> None:
        self.cipher = cipher
        self.data_dir = data_dir
        self.files_dir = data_dir / "files"
        self.tmp_dir = data_dir / "tmp"  # staging: uploads arriving, results being written

    def path(self, relative: str) -> Path:
        return self.data_dir / relative

    def put(self, plain: Path, relative: str) -> None:
        """Move (or encrypt) the plaintext file `plain` to `relative`; on failure nothing is left there."""
        target = self.path(relative)
        ensure_private_dir(target.parent)
        try:
            if self.cipher.enabled:
                with open(plain, "rb") as src:
                    self.cipher.encrypt_stream(src, target)
            else:
                os.chmod(plain, 0o600)
                os.replace(plain, target)
                fsync_dir(target.parent)
        except BaseException:
            self.remove(relative)
            raise

    def put_bytes(self, data: bytes, relative: str) -> None:
        fd, name = tempfile.mkstemp(prefix="blob-", dir=ensure_private_dir(self.tmp_dir))
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            self.put(Path(name), relative)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)

    def exists(self, relative: str) -> bool:
        return self.path(relative).is_file()

    def decrypt_to(self, relative: str, target: Path) -> None:
        """The blob's plaintext at `target` (0600); raises the cipher's TamperedError if it was altered."""
        self.cipher.decrypt_to(self.path(relative), target)

    def chunks(self, relative: str) -> Iterator[bytes]:
        return self.cipher.open_decrypted(self.path(relative))

    def remove(self, relative: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(relative).unlink()
