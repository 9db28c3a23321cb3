"""Revoked tokens: by id, by subject, seen by every gateway on the data dir, refused by the verifier."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import jwt
import pytest

from gateway.auth.keys import ensure_dev_keys
from gateway.auth.revocations import RevocationList, RevocationListUnreadable
from gateway.auth.tokens import TokenVerifier, mint_dev_token
from gateway.cli.main import main
from gateway.core.errors import AuthenticationFailed, GatewayError
from gateway.core.settings import Settings


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("GATEWAY_DATA_DIR", str(tmp_path / "data"))
    settings = Settings(data_dir=str(tmp_path / "data"))
    ensure_dev_keys(settings)
    return settings


def _token(settings: Settings, sub: str = "alice") -> str:
    return mint_dev_token(settings, sub=sub, org="acme", scope="chat", ttl_seconds=600)


def _list(settings: Settings) -> RevocationList:
    return RevocationList(settings.data_path / "keys" / "revoked-tokens.json")


def test_revoking_a_token_id_refuses_that_token_only(settings: Settings) -> None:
    verifier = TokenVerifier.from_settings(settings)
    revoked, kept = _token(settings), _token(settings)
    assert verifier.verify(revoked).subject == "alice"
    claims = jwt.decode(revoked, options={"verify_signature": False})
    _list(settings).revoke_token(claims["jti"], claims["exp"])  # as another gateway's operator would
    with pytest.raises(AuthenticationFailed, match="revoked"):
        verifier.verify(revoked)  # the running verifier re-reads the changed file
    assert verifier.verify(kept).subject == "alice"
    path = settings.data_path / "keys" / "revoked-tokens.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_revoking_a_subject_refuses_its_tokens_issued_until_then(settings: Settings) -> None:
    verifier = TokenVerifier.from_settings(settings)
    old, other = _token(settings), _token(settings, sub="bob")
    _list(settings).revoke_subject("alice")
    with pytest.raises(AuthenticationFailed, match="revoked"):
        verifier.verify(old)
    assert verifier.verify(other).subject == "bob"
    # a revocation made longer ago than the leeway: a token minted now works again, an older one does not
    now, leeway = int(time.time()), settings.auth.leeway_seconds
    _list(settings).revoke_subject("alice", at=now - leeway - 2)
    assert verifier.verify(_token(settings)).subject == "alice"
    with pytest.raises(AuthenticationFailed, match="revoked"):
        verifier.verify(_token_at(settings, iat=now - 2))


def _token_at(settings: Settings, *, iat: int, sub: str = "alice") -> str:
    """A token whose `iat` is given (a minting clock that runs ahead or behind ours)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(
        (settings.data_path / "keys" / "jwt-private.pem").read_bytes(), password=None
    )
    now = int(time.time())
    claims = {
        "iss": settings.auth.issuer,
        "aud": settings.auth.audience,
        "sub": sub,
        "org": "acme",
        "iat": iat,
        "exp": now + 600,
        "scope": "chat",
    }
    return jwt.encode(claims, key, algorithm="EdDSA")  # type: ignore[arg-type]


def test_subject_revocation_covers_the_clock_leeway_ahead(settings: Settings) -> None:
    """verify accepts `iat` up to leeway ahead, so revocation refuses every iat <= revoked_at + leeway."""
    verifier = TokenVerifier.from_settings(settings)
    leeway = settings.auth.leeway_seconds
    at = int(time.time())
    # minted on a clock running ahead, just before the revocation by that clock: verify accepts it
    ahead = _token_at(settings, iat=at + leeway)
    assert verifier.verify(ahead).subject == "alice"
    _list(settings).revoke_subject("alice", at=at)
    with pytest.raises(AuthenticationFailed, match="revoked"):
        verifier.verify(ahead)  # the boundary: iat == revoked_at + leeway is still revoked
    with pytest.raises(AuthenticationFailed, match="revoked"):
        verifier.verify(_token_at(settings, iat=at - 5))
    # one second past the window cannot be verified yet (iat ahead of now + leeway) ...
    with pytest.raises(AuthenticationFailed, match="not valid yet"):
        verifier.verify(_token_at(settings, iat=at + leeway + 5))
    # ... and the list itself says it is not covered by the revocation
    lst = RevocationList(_list(settings).path, leeway_seconds=leeway)
    assert lst.is_revoked({"sub": "alice", "iat": at + leeway})
    assert not lst.is_revoked({"sub": "alice", "iat": at + leeway + 1})
    assert not RevocationList(lst.path).is_revoked({"sub": "alice", "iat": at + 1})  # no leeway: the old rule


def test_entries_for_long_expired_tokens_are_dropped(settings: Settings) -> None:
    revocations = _list(settings)
    revocations.revoke_token("gone", int(time.time()) - 2 * 86400)
    revocations.revoke_token("live", int(time.time()) + 60)
    assert revocations.counts() == (1, 0)
    assert revocations.is_revoked({"jti": "live"}) and not revocations.is_revoked({"jti": "gone"})


def test_an_unreadable_list_fails_closed(settings: Settings) -> None:
    verifier = TokenVerifier.from_settings(settings)
    token = _token(settings)
    path = settings.data_path / "keys" / "revoked-tokens.json"
    path.write_text("{not json")
    with pytest.raises(RevocationListUnreadable):
        _list(settings).is_revoked({"jti": "x"})
    with pytest.raises(GatewayError, match="revocation list") as refused:
        verifier.verify(token)
    assert refused.value.status_code == 500
    path.write_text(json.dumps({"tokens": {}, "subjects": {}}))
    assert verifier.verify(token).subject == "alice"


def test_gateway_revoke_command(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    verifier = TokenVerifier.from_settings(settings)
    token = _token(settings)
    assert main(["revoke", "--token", token]) == 0
    assert "in force: 1 revoked tokens, 0 revoked subjects" in capsys.readouterr().out
    with pytest.raises(AuthenticationFailed, match="revoked"):
        verifier.verify(token)
    assert main(["revoke", "--sub", "bob"]) == 0
    assert main(["revoke", "--jti", "abc"]) == 0
    assert _list(settings).counts() == (2, 1)
    assert main(["revoke", "--token", "not-a-jwt"]) == 2  # a clear message, not a traceback
    assert "gateway:" in capsys.readouterr().err
