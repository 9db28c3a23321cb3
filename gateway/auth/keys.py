"""Key material the gateway makes for itself: the dev JWT key pair, the audit HMAC key, the master key.

Everything is created only when absent (never overwritten: losing the audit or master key would make the
log unverifiable and encrypted files unreadable), with mode 0600 in a 0700 directory, atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from contracts.private_files import write_private_file
from gateway.core.settings import Settings

__all__ = ["DevKeys", "KeyKind", "ensure_dev_keys", "generate_keypair"]

KeyKind = Literal["ed25519", "rsa", "ec"]
SigningKey = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
SYMMETRIC_KEY_BYTES = 32
RSA_BITS = 3072


@dataclass(frozen=True)
class DevKeys:
    """Where each key lives; `created` lists the files this call made."""

    jwt_private: Path | None
    jwt_public: Path | None
    audit_key: Path
    master_key: Path | None
    created: tuple[Path, ...]


def _new_private_key(kind: KeyKind) -> SigningKey:
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"unknown key kind {kind!r}; use ed25519, rsa or ec")


def _pem_pair(key: SigningKey) -> tuple[bytes, bytes]:
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def generate_keypair(kind: KeyKind, out_dir: Path, *, name: str = "jwt") -> tuple[Path, Path]:
    """`gateway keys`: write <name>-private.pem / <name>-public.pem; refuses to overwrite either."""
    private_path, public_path = out_dir / f"{name}-private.pem", out_dir / f"{name}-public.pem"
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; move it away first")
    private, public = _pem_pair(_new_private_key(kind))
    if not write_private_file(private_path, private, exclusive=True):
        raise FileExistsError(f"{private_path} appeared while generating")
    write_private_file(public_path, public, exclusive=True)
    return private_path, public_path


def _ensure_random_key(path: Path, created: list[Path]) -> None:
    if not path.exists() and write_private_file(path, os.urandom(SYMMETRIC_KEY_BYTES), exclusive=True):
        created.append(path)


def ensure_dev_keys(settings: Settings) -> DevKeys:
    """Create whatever key the configuration needs and does not find; leave existing keys alone."""
    created: list[Path] = []
    auth = settings.auth
    jwt_private: Path | None = None
    jwt_public: Path | None = None
    # A JWKS or HS256 deployment verifies with keys someone else manages; no dev pair is needed.
    if not auth.jwks_file and not auth.hs256_secret_file:
        jwt_private = settings.key_path(auth.private_key_file, "jwt-private.pem")
        jwt_public = settings.key_path(auth.public_key_file, "jwt-public.pem")
        # Only when neither exists: a lone public key is an operator's IdP key, not ours to pair.
        if not jwt_private.exists() and not jwt_public.exists():
            private, public = _pem_pair(_new_private_key("ed25519"))
            if write_private_file(jwt_private, private, exclusive=True):
                created.append(jwt_private)
                write_private_file(jwt_public, public)
                created.append(jwt_public)
        elif jwt_private.exists() and not jwt_public.exists():
            key = serialization.load_pem_private_key(jwt_private.read_bytes(), password=None)
            public = key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            if write_private_file(jwt_public, public, exclusive=True):
                created.append(jwt_public)

    audit_key = settings.key_path(settings.audit.key_file, "audit.key")
    _ensure_random_key(audit_key, created)

    master_key: Path | None = None
    privacy = settings.privacy
    if privacy.encrypt_at_rest and not os.environ.get(privacy.master_key_env):
        master_key = settings.key_path(privacy.master_key_file, "master.key")
        _ensure_random_key(master_key, created)

    return DevKeys(jwt_private, jwt_public, audit_key, master_key, tuple(created))
