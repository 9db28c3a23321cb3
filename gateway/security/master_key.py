"""The master key of encryption at rest: where it comes from, and rotating it.

The key comes from the environment variable named in privacy.master_key_env (base64) or else from the key file
(privacy.master_key_file, default <data_dir>/keys/master.key; 32 raw bytes or their base64).  Rotation
(`gateway keys rotate-master`) re-encrypts every sealed file under the data dir under a new key, one file at a
time, crash-safe and re-runnable; encryption.py says why files are re-encrypted rather than rewrapped.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field
from pathlib import Path

from contracts.private_files import fsync_dir, write_private_file
from gateway.core.settings import Settings
from gateway.security.encryption import (
    KEY_BYTES,
    Cipher,
    FileCipher,
    NullCipher,
    TamperedError,
    header_key_id,
    key_id_of,
    regular_files,
)

__all__ = [
    "MasterKeyRotation",
    "RotationReport",
    "cipher_from_settings",
    "load_master_key",
    "master_key_path",
    "read_key_file",
    "retiring_key_path",
    "rotate_master_key",
    "rotate_tree",
]


@dataclass
class RotationReport:
    """What a rotation did, content-free: counts, and paths (relative to the root) that need a look."""

    key_id: str  # the current master key's id (hex); an HMAC of the key, not the key
    rewritten: int = 0  # re-encrypted under the current key
    skipped: int = 0  # already under the current key
    failed: list[Path] = field(default_factory=list)  # under a ring key but did not verify; left as they were
    unknown: list[Path] = field(default_factory=list)  # sealed under a key the ring lacks; left alone


def rotate_tree(cipher: FileCipher, root: Path) -> RotationReport:
    """Re-encrypt every file under `root` sealed by a previous key of the ring; leave the rest alone.

    Files are done one at a time, each replaced atomically, so an interrupted walk leaves each file whole
    under one of the ring's keys, and walking again finishes the job (files already done are skipped).
    """
    report = RotationReport(cipher.key_id)
    for path in regular_files(root):
        key_id = header_key_id(path)
        if key_id is None:
            continue  # not an encrypted file
        if not cipher.reads(key_id):
            report.unknown.append(path.relative_to(root))
            continue
        try:
            rewritten = cipher.reencrypt(path)
        except TamperedError:
            report.failed.append(path.relative_to(root))
            continue
        if rewritten:
            report.rewritten += 1
        else:
            report.skipped += 1
    return report


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
        report = rotate_tree(FileCipher(new_key, previous=[env_key]), settings.data_path)
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
                f"a rotation to master key {key_id_of(current).hex()} was interrupted: finish it first "
                "(run the command again without --new-key-file)"
            )
    else:  # no rotation under way, or one that crashed before installing its new key: start (over)
        new = new_key if new_key is not None else os.urandom(KEY_BYTES)
        if new == current:
            raise ValueError("the new master key is the current one")
        write_private_file(retiring_path, current)  # first, so the old key is never only in memory
        write_private_file(key_path, new)  # the switch: from here on, new files are sealed under `new`
        current, retiring = new, current
    report = rotate_tree(FileCipher(current, previous=[retiring]), settings.data_path)
    if report.failed:
        return MasterKeyRotation(report, resumed, retiring_path, from_env=False)
    kept: Path | None = None
    if keep_old:
        kept = key_path.with_name(f"{key_path.name}.retired-{key_id_of(retiring).hex()}")
        os.replace(retiring_path, kept)
    else:
        retiring_path.unlink()
    fsync_dir(key_path.parent)
    return MasterKeyRotation(report, resumed, kept, from_env=False)
