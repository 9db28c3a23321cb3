"""Optional encryption at rest for uploads, adapters and checkpoints (AES-256-GCM, chunked).

File layout:

    header  = magic "PGWENC" | version (1) | chunk size (u32) | master key id (8) | wrapped data key (40)
              | nonce prefix (8)
    chunk i = AES-256-GCM(data key, nonce = prefix | i (u32), plaintext <= chunk size,
                          aad = header | i (u64) | final flag (1))

Each file gets a random 256-bit data key, wrapped with AES-KW (RFC 3394) under the master key, so the
master key never touches bulk data.  The header is in every chunk's AAD and each chunk is bound to its index
and to whether it is the last one, so flipping a bit, swapping chunks, cutting the file at any point (even on
a chunk boundary) or appending to it raises TamperedError.  Reads stream: each chunk is authenticated before
it is yielded, but a cut file is only known at the end, so write what you read somewhere temporary and keep
it only if the iterator finished (decrypt_to does exactly that).

Where the master key comes from, and rotating it, live in master_key.py.  Rotating (`gateway keys
rotate-master`) re-encrypts every file under
a fresh data key.  Rewrapping only the header is not possible with this layout (the wrapped key is in every
chunk's AAD, so a new wrap would invalidate every tag), and it is not wanted either: the data key would
outlive the retired master key, so that key plus any earlier copy of a header would still open the file.
The rewrite costs no more I/O than a header-only rewrap would (a file is only replaced atomically by writing
all of it again) and verifies every chunk on the way, so a tampered file is reported, never re-sealed.

A FileCipher holds a small keyring: the current master key, which seals everything it writes, and previous
keys it still reads, picked by the key id in each header.  During a rotation the retiring key is kept in
`<master key file>.retiring`, which master_key.cipher_from_settings adds to the ring: a crash at any point
leaves every file readable, by the gateway and by a rerun of the command, which finishes the job.

NullCipher has the same API and passes bytes through, so callers never branch on the setting.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from contracts.private_files import ensure_private_dir, private_file_writer

__all__ = [
    "MAGIC",
    "Cipher",
    "EncryptionError",
    "FileCipher",
    "NullCipher",
    "TamperedError",
    "WrongMasterKey",
    "header_key_id",
    "key_id_of",
    "regular_files",
]

MAGIC = b"PGWENC"
VERSION = 1
KEY_BYTES = 32
TAG_BYTES = 16
DEFAULT_CHUNK = 64 * 1024
_MIN_CHUNK, _MAX_CHUNK = 1024, 16 * 1024 * 1024  # bounds a tampered header's chunk size before it is trusted
_HEADER = struct.Struct(">6sBI8s40s8s")
_MAX_CHUNKS = 2**32


class EncryptionError(Exception):
    """A file cannot be encrypted or decrypted as asked."""


class TamperedError(EncryptionError):
    """The ciphertext or its header was altered, cut, extended or reordered."""


class WrongMasterKey(TamperedError):
    """The file was encrypted under a different master key."""


def key_id_of(master_key: bytes) -> bytes:
    return hmac.new(master_key, b"privacy-gateway master key id", hashlib.sha256).digest()[:8]


def _source_pieces(src: BinaryIO | Iterable[bytes], size: int) -> Iterator[bytes]:
    if hasattr(src, "read"):
        while piece := src.read(size):
            yield piece
    else:
        yield from src


def _chunks(pieces: Iterable[bytes], size: int) -> Iterator[tuple[bytes, bool]]:
    """(chunk, is_final): a full chunk goes out only once a byte after it is seen, so the last is known."""
    buf = bytearray()
    for piece in pieces:
        buf += piece
        while len(buf) > size:
            yield bytes(buf[:size]), False
            del buf[:size]
    yield bytes(buf), True


class Cipher(Protocol):
    enabled: bool

    def encrypt_stream(self, src: BinaryIO | Iterable[bytes], dst_path: Path) -> int: ...
    def open_decrypted(self, path: Path) -> Iterator[bytes]: ...
    def decrypt_to(self, path: Path, dst_path: Path) -> int: ...
    def encrypt_tree(self, root: Path) -> int: ...
    def decrypt_tree(self, root: Path, dst: Path | None = None) -> int: ...


class FileCipher:
    """Encrypts under the current master key (32 bytes); decrypts under it or any of `previous`."""

    enabled = True

    def __init__(
        self, master_key: bytes, *, previous: Iterable[bytes] = (), chunk_size: int = DEFAULT_CHUNK
    ) -> None:
        if not _MIN_CHUNK <= chunk_size <= _MAX_CHUNK:
            raise ValueError("chunk size out of range")
        self._ring: dict[bytes, bytes] = {}  # key id -> master key; the ids are public (in every header)
        for key in (master_key, *previous):
            if len(key) != KEY_BYTES:
                raise ValueError(f"the master key must be {KEY_BYTES} bytes")
            self._ring.setdefault(key_id_of(key), key)
        self._master = master_key
        self._key_id = key_id_of(master_key)
        self._chunk = chunk_size

    @property
    def key_id(self) -> str:
        """The current master key's id (hex), as written into new headers."""
        return self._key_id.hex()

    def reads(self, key_id: bytes) -> bool:
        """Whether a file sealed under master key `key_id` (from its header) is readable here."""
        return key_id in self._ring

    @staticmethod
    def _aad(header: bytes, index: int, final: bool) -> bytes:
        return header + struct.pack(">QB", index, final)

    def encrypt_stream(self, src: BinaryIO | Iterable[bytes], dst_path: Path) -> int:
        """Encrypt everything `src` yields into `dst_path` (atomic, 0600). Returns plaintext bytes."""
        data_key, prefix = AESGCM.generate_key(bit_length=256), os.urandom(8)
        header = _HEADER.pack(
            MAGIC, VERSION, self._chunk, self._key_id, aes_key_wrap(self._master, data_key), prefix
        )
        aead, total = AESGCM(data_key), 0
        with private_file_writer(Path(dst_path)) as out:
            out.write(header)
            for index, (chunk, final) in enumerate(_chunks(_source_pieces(src, self._chunk), self._chunk)):
                if index >= _MAX_CHUNKS:
                    raise EncryptionError("file too large for one encrypted stream")
                nonce = prefix + struct.pack(">I", index)
                out.write(aead.encrypt(nonce, chunk, self._aad(header, index, final)))
                total += len(chunk)
        return total

    def _open_header(self, fh: BinaryIO) -> tuple[bytes, int, AESGCM, bytes]:
        header = fh.read(_HEADER.size)
        if len(header) != _HEADER.size or not header.startswith(MAGIC):
            raise TamperedError("not an encrypted file, or its header was cut")
        _, version, chunk, key_id, wrapped, prefix = _HEADER.unpack(header)
        if version != VERSION:
            raise TamperedError(f"unsupported encrypted file version {version}")
        if not _MIN_CHUNK <= chunk <= _MAX_CHUNK:
            raise TamperedError("the encrypted file's header was altered")
        master = self._ring.get(key_id)
        if master is None:
            raise WrongMasterKey("the file was encrypted under a master key this cipher does not hold")
        try:
            data_key = aes_key_unwrap(master, wrapped)
        except InvalidUnwrap:
            raise TamperedError("the encrypted file's wrapped key was altered") from None
        return header, chunk, AESGCM(data_key), prefix

    def open_decrypted(self, path: Path) -> Iterator[bytes]:
        """Yield the plaintext chunk by chunk; raises TamperedError (possibly only at the end)."""
        with open(path, "rb") as fh:
            header, chunk, aead, prefix = self._open_header(fh)
            block_size = chunk + TAG_BYTES
            block = fh.read(block_size)
            index = 0
            while True:
                following = fh.read(block_size) if len(block) == block_size else b""
                final = not following
                try:
                    nonce = prefix + struct.pack(">I", index)
                    yield aead.decrypt(nonce, block, self._aad(header, index, final))
                except (InvalidTag, ValueError, struct.error):
                    raise TamperedError(f"encrypted chunk {index} was altered, moved or cut") from None
                if final:
                    return
                block, index = following, index + 1

    def decrypt_to(self, path: Path, dst_path: Path) -> int:
        """Decrypt into `dst_path`, which appears (0600) only if the whole file verified."""
        total = 0
        with private_file_writer(Path(dst_path)) as out:
            for piece in self.open_decrypted(path):
                out.write(piece)
                total += len(piece)
        return total

    def is_ours(self, path: Path) -> bool:
        """Whether `path` is encrypted under a master key of this ring (header check only)."""
        try:
            with open(path, "rb") as fh:
                self._open_header(fh)
        except (EncryptionError, OSError):
            return False
        return True

    def encrypt_tree(self, root: Path) -> int:
        """Encrypt every regular file under `root` in place (skipping ones already ours); returns a count."""
        count = 0
        for path in regular_files(root):
            if not self.is_ours(path):
                with open(path, "rb") as src:
                    self.encrypt_stream(src, path)
                count += 1
        return count

    def decrypt_tree(self, root: Path, dst: Path | None = None) -> int:
        """Decrypt every file under `root`, in place or mirrored into `dst` (plain files are copied)."""
        count = 0
        for path in regular_files(root):
            target = path if dst is None else dst / path.relative_to(root)
            ensure_private_dir(target.parent)
            if self.is_ours(path):
                self.decrypt_to(path, target)
                count += 1
            elif dst is not None:
                shutil.copyfile(path, target)
                os.chmod(target, 0o600)
        return count

    def reencrypt(self, path: Path) -> bool:
        """Seal `path` again under the current master key and a fresh data key; False if it already is.

        The whole file is verified on the way and replaced atomically (0600); a file that does not verify
        raises TamperedError and stays exactly as it was.
        """
        if header_key_id(path) == self._key_id:
            return False
        self.encrypt_stream(self.open_decrypted(path), path)
        return True


class NullCipher:
    """Encryption at rest is off: the same API, bytes unchanged (writes still atomic and 0600)."""

    enabled = False

    def encrypt_stream(self, src: BinaryIO | Iterable[bytes], dst_path: Path) -> int:
        total = 0
        with private_file_writer(Path(dst_path)) as out:
            for piece in _source_pieces(src, DEFAULT_CHUNK):
                out.write(piece)
                total += len(piece)
        return total

    def open_decrypted(self, path: Path) -> Iterator[bytes]:
        with open(path, "rb") as fh:
            first = fh.read(DEFAULT_CHUNK)
            if first.startswith(MAGIC + bytes([VERSION])):
                raise EncryptionError(f"{path} is encrypted but encryption at rest is off; configure the key")
            while first:
                yield first
                first = fh.read(DEFAULT_CHUNK)

    def decrypt_to(self, path: Path, dst_path: Path) -> int:
        return self.encrypt_stream(self.open_decrypted(path), dst_path)

    def encrypt_tree(self, root: Path) -> int:
        return 0

    def decrypt_tree(self, root: Path, dst: Path | None = None) -> int:
        if dst is not None:
            for path in regular_files(root):
                self.decrypt_to(path, dst / path.relative_to(root))
        return 0


def header_key_id(path: Path) -> bytes | None:
    """The master key id in `path`'s header, or None when it does not start like a file of ours."""
    with open(path, "rb") as fh:
        header = fh.read(_HEADER.size)
    if len(header) != _HEADER.size or not header.startswith(MAGIC + bytes([VERSION])):
        return None
    key_id: bytes = _HEADER.unpack(header)[3]
    return key_id


def regular_files(root: Path) -> list[Path]:
    # Symlinks are skipped: following one could encrypt (or leak) a file outside the tree.
    return sorted(
        p
        for p in Path(root).rglob("*")
        if p.is_file() and not p.is_symlink() and not (p.name.startswith(".") and p.name.endswith(".tmp"))
    )
