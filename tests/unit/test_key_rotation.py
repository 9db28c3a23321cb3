"""Master key rotation: the keyring, re-encryption, crash and rerun, and `gateway keys rotate-master`."""

from __future__ import annotations

import base64
import fcntl
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from gateway.cli.main import main
from gateway.core.settings import PrivacySettings, Settings
from gateway.security import master_key
from gateway.security.encryption import (
    Cipher,
    FileCipher,
    TamperedError,
    WrongMasterKey,
)
from gateway.security.master_key import (
    cipher_from_settings,
    master_key_path,
    retiring_key_path,
    rotate_master_key,
    rotate_tree,
)

HEADER = 67
REPO = Path(__file__).resolve().parents[2]


def _read(cipher: Cipher, path: Path) -> bytes:
    return b"".join(cipher.open_decrypted(path))


def _key_id_in(path: Path) -> str:
    return path.read_bytes()[11:19].hex()


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.delenv("GATEWAY_MASTER_KEY", raising=False)
    data = tmp_path / "data"
    (data / "keys").mkdir(parents=True)
    (data / "keys" / "master.key").write_bytes(os.urandom(32))
    return Settings(data_dir=str(data), privacy=PrivacySettings(encrypt_at_rest=True))


@pytest.fixture
def files(settings: Settings) -> dict[Path, bytes]:
    """Six sealed files in three places (uploads, an adapter, a checkpoint) plus plain ones left alone."""
    cipher = cipher_from_settings(settings)
    data = settings.data_path
    sealed = {data / "files" / f"file-{n}": os.urandom(n * 700) for n in range(3)} | {
        data / "models" / "ft-1" / "adapter_model.safetensors": os.urandom(5000),
        data / "models" / "ft-1" / "adapter_config.json": b'{"r": 8}',
        data / "jobs" / "job-1" / "checkpoints" / "step-2" / "state.json": b'{"step": 2}',
    }
    for path, plain in sealed.items():
        cipher.encrypt_stream([plain], path)
    (data / "gateway.db").write_bytes(b"SQLite format 3\x00" + os.urandom(100))
    return sealed


def _plain_files_untouched(settings: Settings) -> bool:
    return (settings.data_path / "gateway.db").read_bytes().startswith(b"SQLite format 3\x00")


def test_keyring_reads_previous_keys_and_writes_under_the_current_one(tmp_path: Path) -> None:
    old, new = os.urandom(32), os.urandom(32)
    FileCipher(old).encrypt_stream([b"under the old key"], tmp_path / "a")
    ring = FileCipher(new, previous=[old])
    assert _read(ring, tmp_path / "a") == b"under the old key"
    assert ring.is_ours(tmp_path / "a")
    assert ring.encrypt_tree(tmp_path) == 0  # a file under a previous key is ours: never sealed twice
    ring.encrypt_stream([b"new"], tmp_path / "b")
    assert _key_id_in(tmp_path / "b") == ring.key_id
    with pytest.raises(WrongMasterKey):
        _read(FileCipher(old), tmp_path / "b")
    with pytest.raises(WrongMasterKey):
        _read(FileCipher(new), tmp_path / "a")


def test_reencrypt_uses_a_fresh_data_key_and_the_old_key_opens_nothing(tmp_path: Path) -> None:
    old, new = os.urandom(32), os.urandom(32)
    plain = os.urandom(200_000)
    path = tmp_path / "blob"
    FileCipher(old).encrypt_stream([plain], path)
    before = path.read_bytes()
    ring = FileCipher(new, previous=[old])
    assert ring.reencrypt(path) is True
    after = path.read_bytes()
    assert _key_id_in(path) == ring.key_id
    assert after[19:59] != before[19:59]  # a new wrapped data key ...
    assert after[HEADER : HEADER + 1000] != before[HEADER : HEADER + 1000]  # ... so new ciphertext throughout
    assert _read(FileCipher(new), path) == plain
    with pytest.raises(WrongMasterKey):
        _read(FileCipher(old), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ring.reencrypt(path) is False  # already under the current key
    assert path.read_bytes() == after
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _version_1_file(path: Path, master: bytes, plain: bytes, chunk: int = 1024) -> None:
    """A file written from the documented layout by hand, not by FileCipher: the format did not move."""
    data_key, prefix = os.urandom(32), os.urandom(8)
    key_id = FileCipher(master).key_id
    header = struct.pack(
        ">6sBI8s40s8s", b"PGWENC", 1, chunk, bytes.fromhex(key_id), aes_key_wrap(master, data_key), prefix
    )
    pieces = [plain[i : i + chunk] for i in range(0, len(plain), chunk)] or [b""]
    body = b"".join(
        AESGCM(data_key).encrypt(
            prefix + struct.pack(">I", i), piece, header + struct.pack(">QB", i, i == len(pieces) - 1)
        )
        for i, piece in enumerate(pieces)
    )
    path.write_bytes(header + body)


def test_version_1_files_read_before_and_after_rotation(tmp_path: Path) -> None:
    old, new = os.urandom(32), os.urandom(32)
    plain = os.urandom(3000)
    path = tmp_path / "v1"
    _version_1_file(path, old, plain)
    assert _read(FileCipher(old), path) == plain
    ring = FileCipher(new, previous=[old])
    assert _read(ring, path) == plain
    report = rotate_tree(ring, tmp_path)
    assert (report.rewritten, report.skipped, report.failed) == (1, 0, [])
    assert path.read_bytes()[6] == 1  # still version 1
    assert _read(FileCipher(new), path) == plain


def test_rotation_round_trip_and_key_files(settings: Settings, files: dict[Path, bytes]) -> None:
    old = master_key_path(settings).read_bytes()
    done = rotate_master_key(settings)
    new = master_key_path(settings).read_bytes()
    assert new != old and len(new) == 32
    assert (done.report.rewritten, done.report.skipped, done.report.failed, done.report.unknown) == (
        6,
        0,
        [],
        [],
    )
    assert not done.resumed and done.retired_key is None
    assert not retiring_key_path(settings).exists()
    assert [p.name for p in master_key_path(settings).parent.iterdir()] == ["master.key"]
    for path, plain in files.items():
        assert _read(FileCipher(new), path) == plain  # the new key alone opens everything
        with pytest.raises(WrongMasterKey):
            _read(FileCipher(old), path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(master_key_path(settings).stat().st_mode) == 0o600
    assert _plain_files_untouched(settings)
    again = rotate_master_key(settings)  # a second rotation is a new one, not a no-op
    assert again.report.rewritten == 6 and master_key_path(settings).read_bytes() not in (old, new)


def test_tampering_is_still_detected_after_rotation(settings: Settings, files: dict[Path, bytes]) -> None:
    rotate_master_key(settings)
    cipher = cipher_from_settings(settings)
    for offset in (12, 30, HEADER + 3, -1):  # key id, wrapped key, first chunk, last tag
        path = settings.data_path / "files" / "file-2"
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(TamperedError):
            _read(cipher, path)
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))
    assert (
        _read(cipher, settings.data_path / "files" / "file-2")
        == files[settings.data_path / "files" / "file-2"]
    )


def test_a_tampered_file_is_reported_never_resealed(settings: Settings, files: dict[Path, bytes]) -> None:
    bad = settings.data_path / "files" / "file-1"
    data = bytearray(bad.read_bytes())
    data[-5] ^= 0x01  # the last chunk: found only after the rest was read and re-encrypted to a temp file
    bad.write_bytes(bytes(data))
    done = rotate_master_key(settings)
    assert done.report.failed == [Path("files/file-1")]
    assert done.report.rewritten == 5
    assert bad.read_bytes() == bytes(data)  # left exactly as it was
    assert done.retired_key == retiring_key_path(settings) and done.retired_key.is_file()  # not thrown away
    assert not [p for p in bad.parent.iterdir() if p.name.endswith(".tmp")]
    bad.unlink()  # the operator moves it away; the rerun finishes
    rerun = rotate_master_key(settings)
    assert rerun.resumed and (rerun.report.rewritten, rerun.report.skipped) == (0, 5)
    assert not retiring_key_path(settings).exists()


def test_interrupted_rotation_leaves_everything_readable_and_a_rerun_finishes(
    settings: Settings, files: dict[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    old = master_key_path(settings).read_bytes()
    real = FileCipher.reencrypt
    calls = 0

    def dies_after_two(self: FileCipher, path: Path) -> bool:
        nonlocal calls
        calls += 1
        if calls > 2:
            raise RuntimeError("power cut")
        return real(self, path)

    monkeypatch.setattr(FileCipher, "reencrypt", dies_after_two)
    with pytest.raises(RuntimeError, match="power cut"):
        rotate_master_key(settings)
    monkeypatch.setattr(FileCipher, "reencrypt", real)

    new = master_key_path(settings).read_bytes()
    assert new != old and retiring_key_path(settings).read_bytes() == old
    assert stat.S_IMODE(retiring_key_path(settings).stat().st_mode) == 0o600
    under = {_key_id_in(path) for path in files}
    assert under == {FileCipher(old).key_id, FileCipher(new).key_id}  # half and half ...
    gateway_cipher = cipher_from_settings(settings)  # ... and what the gateway would load reads all of it
    assert all(_read(gateway_cipher, path) == plain for path, plain in files.items())

    with pytest.raises(ValueError, match="interrupted"):
        rotate_master_key(settings, new_key=os.urandom(32))  # not a third key while one rotation is open
    done = rotate_master_key(settings)
    assert done.resumed and (done.report.rewritten, done.report.skipped) == (4, 2)
    assert master_key_path(settings).read_bytes() == new  # finished the same rotation
    assert not retiring_key_path(settings).exists()
    assert all(_read(FileCipher(new), path) == plain for path, plain in files.items())


@pytest.mark.parametrize("failing", [master_key_path, retiring_key_path])
def test_a_failure_while_writing_a_key_file_loses_nothing(
    settings: Settings, files: dict[Path, bytes], monkeypatch: pytest.MonkeyPatch, failing: object
) -> None:
    old = master_key_path(settings).read_bytes()
    real = master_key.write_private_file
    target = failing(settings)  # type: ignore[operator]

    def disk_full(path: Path, data: bytes, *, exclusive: bool = False) -> bool:
        if path == target:
            raise OSError(28, "No space left on device")
        return real(path, data, exclusive=exclusive)

    monkeypatch.setattr(master_key, "write_private_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        rotate_master_key(settings)
    monkeypatch.setattr(master_key, "write_private_file", real)
    cipher = cipher_from_settings(settings)  # whichever write failed, what the gateway loads reads everything
    assert all(_read(cipher, path) == plain for path, plain in files.items())
    done = rotate_master_key(settings)
    assert done.report.rewritten == 6 and master_key_path(settings).read_bytes() != old


def test_a_crash_before_the_new_key_was_installed_starts_over(
    settings: Settings, files: dict[Path, bytes]
) -> None:
    old = master_key_path(settings).read_bytes()
    retiring_key_path(settings).write_bytes(old)  # step 1 done, step 2 (install) never happened
    done = rotate_master_key(settings)
    assert not done.resumed and done.report.rewritten == 6
    assert master_key_path(settings).read_bytes() != old


def test_keep_old_and_a_given_new_key(settings: Settings, files: dict[Path, bytes], tmp_path: Path) -> None:
    old = master_key_path(settings).read_bytes()
    new = os.urandom(32)
    done = rotate_master_key(settings, new_key=new, keep_old=True)
    assert master_key_path(settings).read_bytes() == new
    assert done.retired_key == master_key_path(settings).with_name(
        f"master.key.retired-{FileCipher(old).key_id}"
    )
    assert done.retired_key.read_bytes() == old and stat.S_IMODE(done.retired_key.stat().st_mode) == 0o600
    assert cipher_from_settings(settings).is_ours(next(iter(files)))
    with pytest.raises(ValueError, match="current one"):
        rotate_master_key(settings, new_key=new)


def test_files_under_an_unknown_key_are_left_alone(settings: Settings, files: dict[Path, bytes]) -> None:
    stranger = settings.data_path / "files" / "file-x"
    FileCipher(os.urandom(32)).encrypt_stream([b"someone else's"], stranger)
    before = stranger.read_bytes()
    done = rotate_master_key(settings)
    assert done.report.unknown == [Path("files/file-x")] and done.report.rewritten == 6
    assert stranger.read_bytes() == before


# ── the command ─────────────────────────────────────────────────────────────────────────────────────────────


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {"GATEWAY_DATA_DIR": settings.data_dir, "GATEWAY_PRIVACY__ENCRYPT_AT_REST": "true"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    return values


def test_cli_end_to_end(settings: Settings, files: dict[Path, bytes], env: dict[str, str]) -> None:
    old = master_key_path(settings).read_bytes()
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "keys", "rotate-master"],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    new = master_key_path(settings).read_bytes()
    out = run.stdout.decode()
    assert f"new key id {FileCipher(new).key_id}" in out
    assert "6 files re-encrypted, 0 already under the new key" in out
    for secret in (old, new, *files.values()):  # no key material, no content, in any form
        for form in (secret, secret.hex().encode(), base64.b64encode(secret)):
            assert len(form) < 8 or form not in run.stdout + run.stderr
    assert all(_read(FileCipher(new), path) == plain for path, plain in files.items())
    assert not retiring_key_path(settings).exists()


def test_cli_rerun_after_an_interruption(
    settings: Settings, files: dict[Path, bytes], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    old = master_key_path(settings).read_bytes()
    new = os.urandom(32)
    retiring_key_path(settings).write_bytes(old)
    master_key_path(settings).write_bytes(new)
    FileCipher(new, previous=[old]).reencrypt(next(iter(files)))  # one file done before the "crash"
    assert main(["keys", "rotate-master"]) == 0
    out = capsys.readouterr().out
    assert "finished the interrupted rotation" in out and "5 files re-encrypted, 1 already" in out
    assert all(_read(FileCipher(new), path) == plain for path, plain in files.items())


def test_cli_reports_a_tampered_file_and_keeps_the_old_key(
    settings: Settings, files: dict[Path, bytes], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    bad = settings.data_path / "files" / "file-0"
    bad.write_bytes(bad.read_bytes()[:-1])
    assert main(["keys", "rotate-master"]) == 1
    err = capsys.readouterr().err
    assert "files/file-0" in err and str(retiring_key_path(settings)) in err
    assert retiring_key_path(settings).is_file()


def test_cli_with_the_key_in_the_environment(
    settings: Settings,
    files: dict[Path, bytes],
    env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env_key = os.urandom(32)
    for path, plain in files.items():  # this install seals under the env key
        FileCipher(env_key).encrypt_stream([plain], path)
    monkeypatch.setenv("GATEWAY_MASTER_KEY", base64.b64encode(env_key).decode())
    on_disk = master_key_path(settings).read_bytes()

    assert main(["keys", "rotate-master"]) == 2
    err = capsys.readouterr().err
    assert "GATEWAY_MASTER_KEY" in err and "--new-key-file" in err
    assert all(_key_id_in(path) == FileCipher(env_key).key_id for path in files)  # nothing touched

    new = os.urandom(32)
    (tmp_path / "new.key").write_bytes(base64.b64encode(new) + b"\n")
    assert main(["keys", "rotate-master", "--new-key-file", str(tmp_path / "new.key")]) == 0
    out = capsys.readouterr().out
    assert "6 files re-encrypted" in out and "set GATEWAY_MASTER_KEY" in out
    assert master_key_path(settings).read_bytes() == on_disk  # no key file written or changed
    assert not retiring_key_path(settings).exists()
    monkeypatch.setenv("GATEWAY_MASTER_KEY", base64.b64encode(new).decode())  # the operator's last step
    cipher = cipher_from_settings(settings)
    assert all(_read(cipher, path) == plain for path, plain in files.items())


@pytest.mark.parametrize(
    ("held", "who"), [("audit/audit.jsonl", "the gateway"), ("workers/host-0.lock", "a fine-tuning worker")]
)
def test_cli_refuses_while_the_service_runs(
    settings: Settings,
    files: dict[Path, bytes],
    env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    held: str,
    who: str,
) -> None:
    path = settings.data_path / held
    path.parent.mkdir(parents=True, exist_ok=True)
    key = master_key_path(settings).read_bytes()
    with open(path, "a") as fh:  # a running gateway holds this lock for its life
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["keys", "rotate-master"]) == 2
    assert f"{who} is running" in capsys.readouterr().err
    assert master_key_path(settings).read_bytes() == key and not retiring_key_path(settings).exists()
    assert main(["keys", "rotate-master"]) == 0  # stopped: the lock is free


def test_cli_refuses_when_encryption_is_off(
    settings: Settings,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("GATEWAY_PRIVACY__ENCRYPT_AT_REST", "false")
    assert main(["keys", "rotate-master"]) == 2
    assert "encrypt_at_rest is off" in capsys.readouterr().err


def test_keys_without_a_subcommand_still_makes_a_signing_pair(tmp_path: Path) -> None:
    assert main(["keys", "--out", str(tmp_path), "--name", "t"]) == 0
    assert (tmp_path / "t-private.pem").is_file() and (tmp_path / "t-public.pem").is_file()


def test_a_gateway_started_during_the_rotation_fails_at_start_up(settings: Settings) -> None:
    from gateway.audit.log import AuditLog, AuditLogBusy
    from gateway.cli.main import _service_stopped

    path, key = settings.data_path / settings.audit.path, os.urandom(32)
    AuditLog(path, key).close()  # a gateway ran here before
    with _service_stopped(settings), pytest.raises(AuditLogBusy):
        AuditLog(path, key)
    AuditLog(path, key).close()  # and starts once the rotation is over
