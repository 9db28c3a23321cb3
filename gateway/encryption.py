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

Rotating the master key (`gateway keys rotate-master`, rotate_master_key below) re-encrypts every file under
a fresh data key.  Rewrapping only the header is not possible with this layout (the wrapped key is in every
chunk's AAD, so a new wrap would invalidate every tag), and it is not wanted either: the data key would
outlive the retired master key, so that key plus any earlier copy of a header would still open the file.
The rewrite costs no more I/O than a header-only rewrap would (a file is only replaced atomically by writing
all of it again) and verifies every chunk on the way, so a tampered file is reported, never re-sealed.

A FileCipher holds a small keyring: the current master key, which seals everything it writes, and previous
keys it still reads, picked by the key id in each header.  During a rotation the retiring key is kept in
`<master key file>.retiring`, which cipher_from_settings adds to the ring: a crash at any point leaves every
file readable, by the gateway and by a rerun of the command, which finishes the job.

NullCipher has the same API and passes bytes through, so callers never branch on the setting.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from gateway.private_files import ensure_private_dir, fsync_dir, private_file_writer, write_private_file
from gateway.settings import Settings

__all__ = [
    "Cipher",
    "EncryptionError",
    "FileCipher",
    "MasterKeyRotation",
    "NullCipher",
    "RotationReport",
    "TamperedError",
    "WrongMasterKey",
    "cipher_from_settings",
    "load_master_key",
    "master_key_path",
    "read_key_file",
    "retiring_key_path",
    "rotate_master_key",
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


def _key_id(master_key: bytes) -> bytes:
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


@dataclass
class RotationReport:
    """What a rotation did, content-free: counts, and paths (relative to the root) that need a look."""

    key_id: str  # the current master key's id (hex); an HMAC of the key, not the key
    rewritten: int = 0  # re-encrypted under the current key
    skipped: int = 0  # already under the current key
    failed: list[Path] = field(default_factory=list)  # under a ring key but did not verify; left as they were
    unknown: list[Path] = field(default_factory=list)  # sealed under a key the ring lacks; left alone


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
            self._ring.setdefault(_key_id(key), key)
        self._master = master_key
        self._key_id = _key_id(master_key)
        self._chunk = chunk_size

    @property
    def key_id(self) -> str:
        """The current master key's id (hex), as written into new headers."""
        return self._key_id.hex()

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
        for path in _regular_files(root):
            if not self.is_ours(path):
                with open(path, "rb") as src:
                    self.encrypt_stream(src, path)
                count += 1
        return count

    def decrypt_tree(self, root: Path, dst: Path | None = None) -> int:
        """Decrypt every file under `root`, in place or mirrored into `dst` (plain files are copied)."""
        count = 0
        for path in _regular_files(root):
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
        if _header_key_id(path) == self._key_id:
            return False
        self.encrypt_stream(self.open_decrypted(path), path)
        return True

    def rotate_tree(self, root: Path) -> RotationReport:
        """Re-encrypt every file under `root` sealed by a previous key of the ring; leave the rest alone.

        Files are done one at a time, each replaced atomically, so an interrupted walk leaves each file whole
        under one of the ring's keys, and walking again finishes the job (files already done are skipped).
        """
        report = RotationReport(self.key_id)
        for path in _regular_files(root):
            key_id = _header_key_id(path)
            if key_id is None:
                continue  # not an encrypted file
            if key_id not in self._ring:
                report.unknown.append(path.relative_to(root))
                continue
            try:
                rewritten = self.reencrypt(path)
            except TamperedError:
                report.failed.append(path.relative_to(root))
                continue
            if rewritten:
                report.rewritten += 1
            else:
                report.skipped += 1
        return report


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
            for path in _regular_files(root):
                self.decrypt_to(path, dst / path.relative_to(root))
        return 0


def _header_key_id(path: Path) -> bytes | None:
    """The master key id in `path`'s header, or None when it does not start like a file of ours."""
    with open(path, "rb") as fh:
        header = fh.read(_HEADER.size)
    if len(header) != _HEADER.size or not header.startswith(MAGIC + bytes([VERSION])):
        return None
    key_id: bytes = _HEADER.unpack(header)[3]
    return key_id


def _regular_files(root: Path) -> list[Path]:
    # Symlinks are skipped: following one could encrypt (or leak) a file outside the tree.
    return sorted(
        p
        for p in Path(root).rglob("*")
        if p.is_file() and not p.is_symlink() and not (p.name.startswith(".") and p.name.endswith(".tmp"))
    )


def _decode_key(raw: bytes, source: str) -> bytes:
    """32 raw bytes, or their base64 (surrounding white space ignored)."""
    if len(raw) == KEY_BYTES:
        return raw
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except binascii.Error:
        key = b""
    if len(key) != KEY_BYTES:
        raise ValueError(f"{source} must hold {KEY_BYTES} raw bytes or their base64")
    return key


def read_key_file(path: Path) -> bytes:
    """A master key from a file (32 raw bytes or their base64); FileNotFoundError when there is none."""
    return _decode_key(Path(path).read_bytes(), str(path))


def _env_key(settings: Settings) -> bytes | None:
    name = settings.privacy.master_key_env
    encoded = os.environ.get(name, "").strip()
    if not encoded:
        return None
    try:
        key = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise ValueError(f"{name} is not valid base64") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"{name} must decode to {KEY_BYTES} bytes")
    return key


def master_key_path(settings: Settings) -> Path:
    """privacy.master_key_file, or <data_dir>/keys/master.key."""
    return settings.key_path(settings.privacy.master_key_file, "master.key")


def retiring_key_path(settings: Settings) -> Path:
    """Where the previous master key waits, still read, while a rotation runs: <master key file>.retiring."""
    path = master_key_path(settings)
    return path.with_name(path.name + ".retiring")


def _read_optional(path: Path) -> bytes | None:
    try:
        return read_key_file(path)
    except FileNotFoundError:
        return None


def load_master_key(settings: Settings) -> bytes | None:
    """The master key from the env var named in privacy.master_key_env (base64), else the key file."""
    key = _env_key(settings)
    return key if key is not None else _read_optional(master_key_path(settings))


def cipher_from_settings(settings: Settings) -> Cipher:
    """The configured cipher; with a rotation under way its retiring key is on the ring, read-only."""
    if not settings.privacy.encrypt_at_rest:
        return NullCipher()
    key = load_master_key(settings)
    if key is None:
        raise ValueError(
            "privacy.encrypt_at_rest is on but there is no master key: set "
            f"{settings.privacy.master_key_env} or create the key file (gateway serve does on first start)"
        )
    retiring = _read_optional(retiring_key_path(settings))
    return FileCipher(key, previous=[retiring] if retiring is not None else [])


@dataclass(frozen=True)
class MasterKeyRotation:
    report: RotationReport
    resumed: bool  # this run finished one a crash interrupted
    retired_key: Path | None  # where the old key still is (kept, or a file failed), None once removed
    from_env: bool  # the old key came from the environment: now update it (see rotate_master_key)


def rotate_master_key(
    settings: Settings, *, new_key: bytes | None = None, keep_old: bool = False
) -> MasterKeyRotation:
    """Re-encrypt every file under the data dir under a new master key and make that key the current one.

    Key file setup (crash-safe, re-runnable): the old key is copied to <key file>.retiring, then the new one
    (`new_key`, or 32 random bytes) atomically replaces the key file, then every file is re-encrypted.  While
    the .retiring file exists the configured cipher reads both keys, and a rerun finishes the interrupted
    rotation instead of starting another.  The .retiring file is removed at the end, or renamed to
    <key file>.retired-<key id> with `keep_old`; it stays where it is when a file failed to verify.

    Environment setup (privacy.master_key_env is set): `new_key` is required and is read from a file the
    operator keeps; files are re-encrypted under it, nothing is written to the key file, and the operator
    then puts the new key in the environment.  Until then the gateway cannot read what was re-encrypted.

    Run it with the gateway and workers stopped: they keep the key they started with and would seal new
    files under the retired one.
    """
    env_key, env_name = _env_key(settings), settings.privacy.master_key_env
    if env_key is not None:
        if new_key is None:
            raise ValueError(
                f"the master key comes from {env_name}, which this command cannot change: make a new key "
                "file (head -c 32 /dev/urandom > new.key), run `gateway keys rotate-master --new-key-file "
                f"new.key`, then set {env_name} to `base64 -w0 new.key` before starting the service again"
            )
        if new_key == env_key:
            raise ValueError(f"the new master key is the one already in {env_name}")
        report = FileCipher(new_key, previous=[env_key]).rotate_tree(settings.data_path)
        return MasterKeyRotation(report, resumed=False, retired_key=None, from_env=True)

    key_path, retiring_path = master_key_path(settings), retiring_key_path(settings)
    try:
        current = read_key_file(key_path)
    except FileNotFoundError:
        raise ValueError(f"there is no master key at {key_path}: nothing to rotate") from None
    retiring = _read_optional(retiring_path)
    resumed = False
    if retiring is not None and retiring != current:  # a rotation to `current` was interrupted
        resumed = True
        if new_key is not None and new_key != current:
            raise ValueError(
                f"a rotation to master key {_key_id(current).hex()} was interrupted: finish it first "
                "(run the command again without --new-key-file)"
            )
    else:  # no rotation under way, or one that crashed before installing its new key: start (over)
        new = new_key if new_key is not None else os.urandom(KEY_BYTES)
        if new == current:
            raise ValueError("the new master key is the current one")
        write_private_file(retiring_path, current)  # first, so the old key is never only in memory
        write_private_file(key_path, new)  # the switch: from here on, new files are sealed under `new`
        current, retiring = new, current
    report = FileCipher(current, previous=[retiring]).rotate_tree(settings.data_path)
    if report.failed:
        return MasterKeyRotation(report, resumed, retiring_path, from_env=False)
    kept: Path | None = None
    if keep_old:
        kept = key_path.with_name(f"{key_path.name}.retired-{_key_id(retiring).hex()}")
        os.replace(retiring_path, kept)
    else:
        retiring_path.unlink()
    fsync_dir(key_path.parent)
    return MasterKeyRotation(report, resumed, kept, from_env=False)
