"""Encryption at rest: round trips, and every kind of tampering raises TamperedError."""

from __future__ import annotations

import base64
import io
import os
import stat
from pathlib import Path

import pytest

from gateway.core.settings import PrivacySettings, Settings
from gateway.security.encryption import (
    MAGIC,
    EncryptionError,
    FileCipher,
    NullCipher,
    TamperedError,
    WrongMasterKey,
)
from gateway.security.master_key import cipher_from_settings, load_master_key

CHUNK = 1024  # small chunks so a few KiB span many of them
HEADER = 67
BLOCK = CHUNK + 16


@pytest.fixture
def cipher() -> FileCipher:
    return FileCipher(os.urandom(32), chunk_size=CHUNK)


def _read(cipher: FileCipher, path: Path) -> bytes:
    return b"".join(cipher.open_decrypted(path))


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 5 * CHUNK + 17])
def test_round_trip(cipher: FileCipher, tmp_path: Path, size: int) -> None:
    plain = os.urandom(size)
    dst = tmp_path / "blob.enc"
    assert cipher.encrypt_stream(io.BytesIO(plain), dst) == size
    assert _read(cipher, dst) == plain
    assert size < 32 or plain[:32] not in dst.read_bytes()
    assert stat.S_IMODE(dst.stat().st_mode) == 0o600
    assert cipher.decrypt_to(dst, tmp_path / "out" / "plain") == size
    assert (tmp_path / "out" / "plain").read_bytes() == plain


def test_iterable_source_with_odd_pieces(cipher: FileCipher, tmp_path: Path) -> None:
    pieces = [os.urandom(n) for n in (1, 700, 2000, 0, 1024, 5)]
    cipher.encrypt_stream(iter(pieces), tmp_path / "x")
    assert _read(cipher, tmp_path / "x") == b"".join(pieces)


def test_same_plaintext_encrypts_differently(cipher: FileCipher, tmp_path: Path) -> None:
    cipher.encrypt_stream([b"same"], tmp_path / "a")
    cipher.encrypt_stream([b"same"], tmp_path / "b")
    assert (tmp_path / "a").read_bytes() != (tmp_path / "b").read_bytes()


@pytest.fixture
def sealed(cipher: FileCipher, tmp_path: Path) -> Path:
    path = tmp_path / "sealed"
    cipher.encrypt_stream([os.urandom(4 * CHUNK + 100)], path)  # 5 chunks
    return path


def _expect_tampered(cipher: FileCipher, path: Path) -> None:
    with pytest.raises(TamperedError):
        _read(cipher, path)


@pytest.mark.parametrize("offset", [0, 7, 12, 20, 60, HEADER, HEADER + 500, HEADER + BLOCK + 3, -1])
def test_any_bit_flip_is_detected(cipher: FileCipher, sealed: Path, offset: int) -> None:
    data = bytearray(sealed.read_bytes())
    data[offset] ^= 0x01
    sealed.write_bytes(bytes(data))
    _expect_tampered(cipher, sealed)


@pytest.mark.parametrize("cut", [1, 16, 100, BLOCK, 2 * BLOCK])
def test_truncation_is_detected_even_on_chunk_boundaries(cipher: FileCipher, sealed: Path, cut: int) -> None:
    data = sealed.read_bytes()
    sealed.write_bytes(data[: len(data) - cut])
    _expect_tampered(cipher, sealed)


def test_truncation_to_header_only_is_detected(cipher: FileCipher, sealed: Path) -> None:
    sealed.write_bytes(sealed.read_bytes()[:HEADER])
    _expect_tampered(cipher, sealed)


def test_reordered_chunks_are_detected(cipher: FileCipher, sealed: Path) -> None:
    data = sealed.read_bytes()
    header, body = data[:HEADER], data[HEADER:]
    blocks = [body[i : i + BLOCK] for i in range(0, len(body), BLOCK)]
    blocks[1], blocks[2] = blocks[2], blocks[1]
    sealed.write_bytes(header + b"".join(blocks))
    _expect_tampered(cipher, sealed)


def test_appended_data_is_detected(cipher: FileCipher, sealed: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    cipher.encrypt_stream([os.urandom(CHUNK)], other)
    with open(sealed, "ab") as fh:
        fh.write(other.read_bytes()[HEADER:])
    _expect_tampered(cipher, sealed)


def test_spliced_chunk_is_detected(cipher: FileCipher, sealed: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    cipher.encrypt_stream([os.urandom(4 * CHUNK + 100)], other)
    data, foreign = bytearray(sealed.read_bytes()), other.read_bytes()
    data[HEADER : HEADER + BLOCK] = foreign[HEADER : HEADER + BLOCK]
    sealed.write_bytes(bytes(data))
    _expect_tampered(cipher, sealed)


def test_wrong_master_key(cipher: FileCipher, sealed: Path) -> None:
    with pytest.raises(WrongMasterKey):
        _read(FileCipher(os.urandom(32), chunk_size=CHUNK), sealed)


def test_failed_decrypt_leaves_no_output(cipher: FileCipher, sealed: Path, tmp_path: Path) -> None:
    data = sealed.read_bytes()
    sealed.write_bytes(data[:-BLOCK])
    with pytest.raises(TamperedError):
        cipher.decrypt_to(sealed, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_plain_file_is_not_mistaken_for_ciphertext(cipher: FileCipher, tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"hello")
    _expect_tampered(cipher, tmp_path / "plain")


def test_directory_in_place(cipher: FileCipher, tmp_path: Path) -> None:
    root = tmp_path / "adapter"
    (root / "sub").mkdir(parents=True)
    files = {
        root / "adapter_model.safetensors": os.urandom(3000),
        root / "sub" / "config.json": b'{"r": 8}',
        root / "empty": b"",
    }
    for path, data in files.items():
        path.write_bytes(data)
    (root / "link").symlink_to(tmp_path / "outside")
    (tmp_path / "outside").write_bytes(b"not ours")
    assert cipher.encrypt_tree(root) == 3
    assert cipher.encrypt_tree(root) == 0  # already ours: not encrypted twice
    assert all(path.read_bytes().startswith(MAGIC) for path in files)
    assert (tmp_path / "outside").read_bytes() == b"not ours"  # symlinks are not followed
    mirror = tmp_path / "mirror"
    assert cipher.decrypt_tree(root, mirror) == 3
    assert all((mirror / path.relative_to(root)).read_bytes() == data for path, data in files.items())
    assert cipher.decrypt_tree(root) == 3
    assert all(path.read_bytes() == data for path, data in files.items())


def test_plain_file_with_the_magic_gets_encrypted(cipher: FileCipher, tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    (root / "f").write_bytes(MAGIC + b"\x01" + os.urandom(200))
    assert cipher.encrypt_tree(root) == 1
    assert cipher.is_ours(root / "f")


def test_null_cipher_passes_bytes_through(tmp_path: Path) -> None:
    null = NullCipher()
    plain = os.urandom(200_000)
    assert null.encrypt_stream(io.BytesIO(plain), tmp_path / "f") == len(plain)
    assert (tmp_path / "f").read_bytes() == plain
    assert b"".join(null.open_decrypted(tmp_path / "f")) == plain
    assert null.decrypt_to(tmp_path / "f", tmp_path / "g") == len(plain)
    assert (tmp_path / "g").read_bytes() == plain
    assert null.encrypt_tree(tmp_path) == 0


def test_null_cipher_refuses_encrypted_files(cipher: FileCipher, sealed: Path) -> None:
    with pytest.raises(EncryptionError, match="encryption at rest is off"):
        b"".join(NullCipher().open_decrypted(sealed))


def test_master_key_from_env_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(data_dir=str(tmp_path), privacy=PrivacySettings(encrypt_at_rest=True))
    monkeypatch.delenv("GATEWAY_MASTER_KEY", raising=False)
    assert load_master_key(settings) is None
    with pytest.raises(ValueError, match="no master key"):
        cipher_from_settings(settings)
    file_key = os.urandom(32)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "master.key").write_bytes(file_key)
    assert load_master_key(settings) == file_key
    env_key = os.urandom(32)
    monkeypatch.setenv("GATEWAY_MASTER_KEY", base64.b64encode(env_key).decode())
    assert load_master_key(settings) == env_key  # the env var wins
    assert cipher_from_settings(settings).enabled
    monkeypatch.setenv("GATEWAY_MASTER_KEY", base64.b64encode(b"short").decode())
    with pytest.raises(ValueError, match="32 bytes"):
        load_master_key(settings)
    monkeypatch.setenv("GATEWAY_MASTER_KEY", "not base64 !!")
    with pytest.raises(ValueError, match="base64"):
        load_master_key(settings)


def test_off_means_null_cipher(tmp_path: Path) -> None:
    assert not cipher_from_settings(Settings(data_dir=str(tmp_path))).enabled
