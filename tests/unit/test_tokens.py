"""JWT rules: key-bound algorithms, required claims, exact iss/aud, time checks, JWKS, scopes and tenant."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.auth.keys import ensure_dev_keys, generate_keypair
from gateway.auth.tokens import TokenVerifier, mint_dev_token, mint_token, parse_ttl
from gateway.core.errors import AuthenticationFailed
from gateway.core.settings import AuthSettings, PrivacySettings, Settings

ISS, AUD = "test-issuer", "test-audience"


def _pem_public(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    }


def _verifier(key: Any, algorithms: list[str], leeway: int = 0) -> TokenVerifier:
    return TokenVerifier.from_pem(
        _pem_public(key), algorithms=algorithms, issuer=ISS, audience=AUD, leeway_seconds=leeway
    )


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "alice",
        "org": "acme",
        "iat": now,
        "exp": now + 300,
        "scope": "chat models:read",
    }
    for name, value in overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hand_made(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}.{_b64(signature)}"


def _reason(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthenticationFailed) as info:
        verifier.verify(token)
    assert info.value.status_code == 401
    assert "Bearer" in info.value.headers["WWW-Authenticate"]
    return info.value.message


# ── each asymmetric family verifies with its own algorithm ─────────────────────────────────────────────────


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_each_key_family_verifies_its_algorithm(keys: dict[str, Any], alg: str) -> None:
    token = jwt.encode(_claims(), keys[alg], algorithm=alg)
    principal = _verifier(keys[alg], [alg]).verify(token)
    assert principal.subject == "alice"
    assert principal.tenant == "acme"
    assert principal.scopes == frozenset({"chat", "models:read"})


def test_rsa_key_also_takes_pss(keys: dict[str, Any]) -> None:
    token = jwt.encode(_claims(), keys["RS256"], algorithm="PS256")
    assert _verifier(keys["RS256"], ["RS256", "PS256"]).verify(token).subject == "alice"
    assert "not allowed" in _reason(_verifier(keys["RS256"], ["RS256"]), token)


@pytest.mark.parametrize(
    ("alg", "configured"), [("RS256", ["EdDSA"]), ("ES256", ["RS256", "HS256"]), ("EdDSA", ["ES256"])]
)
def test_algorithms_not_fitting_the_key_are_a_startup_error(
    keys: dict[str, Any], alg: str, configured: list[str]
) -> None:
    with pytest.raises(ValueError, match="cannot be used with"):
        _verifier(keys[alg], configured)


def test_ec_key_only_takes_the_es_algorithm_of_its_curve() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ValueError, match="ES384"):
        _verifier(p384, ["ES256"])
    token = jwt.encode(_claims(), p384, algorithm="ES384")
    assert _verifier(p384, ["ES256", "ES384"]).verify(token).subject == "alice"


# ── algorithm attacks ──────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_rejected(keys: dict[str, Any], alg: str) -> None:
    token = _hand_made({"alg": alg, "typ": "JWT"}, _claims())
    assert "unsigned" in _reason(_verifier(keys["EdDSA"], ["EdDSA"]), token)


def test_hs256_signed_with_the_public_key_is_rejected(keys: dict[str, Any]) -> None:
    """Classic key confusion: the attacker HMACs with the server's public PEM as the secret."""
    public_pem = _pem_public(keys["RS256"])
    header = {"alg": "HS256", "typ": "JWT"}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(_claims()).encode())}"
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{_b64(signature)}"
    # Even a misconfigured allow-list naming HS256 cannot make an RSA key verify an HMAC.
    verifier = _verifier(keys["RS256"], ["RS256", "HS256"])
    assert "not allowed" in _reason(verifier, token)


def test_token_signed_by_another_key_fails(keys: dict[str, Any]) -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    token = jwt.encode(_claims(), other, algorithm="EdDSA")
    assert "signature is invalid" in _reason(_verifier(keys["EdDSA"], ["EdDSA"]), token)


def test_flipped_payload_fails(keys: dict[str, Any]) -> None:
    token = jwt.encode(_claims(), keys["EdDSA"], algorithm="EdDSA")
    head, _, sig = token.split(".")
    forged = f"{head}.{_b64(json.dumps(_claims(scope='admin')).encode())}.{sig}"
    assert "signature is invalid" in _reason(_verifier(keys["EdDSA"], ["EdDSA"]), forged)


@pytest.mark.parametrize(
    "garbage", ["", "abc", "a.b.c", "....", "eyJhbGciOiJFZERTQSJ9.e30", "x" * 10_000, "Bearer abc.def.ghi"]
)
def test_garbage_is_malformed(keys: dict[str, Any], garbage: str) -> None:
    reason = _reason(_verifier(keys["EdDSA"], ["EdDSA"]), garbage)
    assert garbage[:20] not in reason or not garbage


@pytest.mark.parametrize("crit", [["b64"], ["x-private-ext"], ["exp"], []])
def test_crit_header_is_rejected(keys: dict[str, Any], crit: list[str]) -> None:
    """Validly signed, but naming extensions the gateway does not implement (RFC 7515 §4.1.11)."""
    signing_input = f"{_b64(json.dumps({'alg': 'EdDSA', 'crit': crit}).encode())}."
    signing_input += _b64(json.dumps(_claims()).encode())
    token = f"{signing_input}.{_b64(keys['EdDSA'].sign(signing_input.encode()))}"
    assert _reason(_verifier(keys["EdDSA"], ["EdDSA"]), token)


@pytest.mark.parametrize(("typ", "ok"), [("JWT", True), ("at+jwt", True), ("dpop+jwt", False)])
def test_typ_header(keys: dict[str, Any], typ: str, ok: bool) -> None:
    token = jwt.encode(_claims(), keys["EdDSA"], algorithm="EdDSA", headers={"typ": typ})
    verifier = _verifier(keys["EdDSA"], ["EdDSA"])
    if ok:
        assert verifier.verify(token).subject == "alice"
    else:
        assert "type" in _reason(verifier, token)


# ── claims ─────────────────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "iss", "aud"])
def test_required_claims(keys: dict[str, Any], claim: str) -> None:
    token = jwt.encode(_claims(**{claim: None}), keys["EdDSA"], algorithm="EdDSA")
    assert f"'{claim}'" in _reason(_verifier(keys["EdDSA"], ["EdDSA"]), token)


@dataclass(frozen=True)
class FromNow:
    seconds: int


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"aud": "other-service"}, "audience"),
        ({"aud": ["other-service", "x"]}, "audience"),
        ({"aud": AUD + "-suffix"}, "audience"),
        ({"iss": "evil-issuer"}, "issuer"),
        ({"iss": ISS[:-1]}, "issuer"),
        ({"exp": FromNow(-120)}, "expired"),
        ({"nbf": FromNow(120)}, "not valid yet"),
        ({"iat": FromNow(120)}, "not valid yet"),
        ({"sub": ""}, "'sub'"),
        ({"sub": 42}, "'sub'"),
        ({"org": ["acme"]}, "'org'"),
        ({"org": "a\nb"}, "'org'"),
        ({"scope": ["chat"]}, "scope"),
    ],
)
def test_claim_checks(keys: dict[str, Any], overrides: dict[str, Any], expected: str) -> None:
    now = int(time.time())  # times are taken when the test runs, not when it is collected
    resolved = {k: now + v.seconds if isinstance(v, FromNow) else v for k, v in overrides.items()}
    token = jwt.encode(_claims(**resolved), keys["EdDSA"], algorithm="EdDSA")
    reason = _reason(_verifier(keys["EdDSA"], ["EdDSA"], leeway=30), token)
    assert expected in reason
    assert token not in reason and token.split(".")[1] not in reason


def test_audience_list_holding_ours_is_accepted(keys: dict[str, Any]) -> None:
    token = jwt.encode(_claims(aud=["userinfo", AUD]), keys["EdDSA"], algorithm="EdDSA")
    assert _verifier(keys["EdDSA"], ["EdDSA"]).verify(token).subject == "alice"


def test_leeway_tolerates_small_skew(keys: dict[str, Any]) -> None:
    now = int(time.time())
    skewed = ((_claims(exp=now - 10), "expired"), (_claims(nbf=now + 10), "not valid yet"))
    for claims, strict_reason in skewed:
        token = jwt.encode(claims, keys["EdDSA"], algorithm="EdDSA")
        assert _verifier(keys["EdDSA"], ["EdDSA"], leeway=30).verify(token).subject == "alice"
        assert strict_reason in _reason(_verifier(keys["EdDSA"], ["EdDSA"], leeway=0), token)


def test_scopes_keep_only_known_ones(keys: dict[str, Any]) -> None:
    claims = _claims(scope="chat  files:write superuser admin:all  fine_tuning:read")
    token = jwt.encode(claims, keys["EdDSA"], algorithm="EdDSA")
    principal = _verifier(keys["EdDSA"], ["EdDSA"]).verify(token)
    assert principal.scopes == frozenset({"chat", "files:write", "fine_tuning:read"})
    assert principal.tenant == "acme"
    assert not principal.is_admin


def _subject_mode_verifier(key: Any) -> TokenVerifier:
    return TokenVerifier.from_pem(
        _pem_public(key), algorithms=["EdDSA"], issuer=ISS, audience=AUD, missing_tenant="subject"
    )


def test_missing_tenant_claim_is_refused_by_default(keys: dict[str, Any]) -> None:
    """{sub: "acme"} must never land in organisation acme's tenant."""
    token = jwt.encode(_claims(sub="acme", org=None), keys["EdDSA"], algorithm="EdDSA")
    assert "lacks the required 'org'" in _reason(_verifier(keys["EdDSA"], ["EdDSA"]), token)
    assert AuthSettings().missing_tenant == "reject"


def test_missing_tenant_subject_mode_gets_a_namespace_no_org_can_enter(keys: dict[str, Any]) -> None:
    verifier = _subject_mode_verifier(keys["EdDSA"])
    lone = verifier.verify(jwt.encode(_claims(sub="acme", org=None), keys["EdDSA"], algorithm="EdDSA"))
    member = verifier.verify(jwt.encode(_claims(sub="bob", org="acme"), keys["EdDSA"], algorithm="EdDSA"))
    assert (lone.subject, lone.tenant) == ("acme", "user:acme")
    assert member.tenant == "acme" and lone.tenant != member.tenant
    # an org claiming the subject namespace is refused, in either mode
    forged = jwt.encode(_claims(sub="mallory", org="user:acme"), keys["EdDSA"], algorithm="EdDSA")
    assert "invalid 'org'" in _reason(verifier, forged)
    assert "invalid 'org'" in _reason(_verifier(keys["EdDSA"], ["EdDSA"]), forged)


def test_missing_tenant_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="missing_tenant"):
        AuthSettings(missing_tenant="guess")
    assert AuthSettings(missing_tenant="subject").missing_tenant == "subject"


def test_dev_token_without_org_names_the_subject_as_org(tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"))
    ensure_dev_keys(settings)
    token = mint_dev_token(settings, sub="carol", org=None, scope="chat", ttl_seconds=60)
    assert jwt.decode(token, options={"verify_signature": False})["org"] == "carol"
    assert TokenVerifier.from_settings(settings).verify(token).tenant == "carol"


def test_missing_scope_means_no_scopes(keys: dict[str, Any]) -> None:
    token = jwt.encode(_claims(scope=None), keys["EdDSA"], algorithm="EdDSA")
    assert _verifier(keys["EdDSA"], ["EdDSA"]).verify(token).scopes == frozenset()


# ── JWKS ───────────────────────────────────────────────────────────────────────────────────────────────────


def _jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = jwt.get_algorithm_by_name(alg)
    entry: dict[str, Any] = json.loads(algorithm.to_jwk(key.public_key()))
    return {**entry, "kid": kid, "use": "sig"}


@pytest.fixture(scope="module")
def jwks_verifier(keys: dict[str, Any]) -> TokenVerifier:
    jwks = {"keys": [_jwk(keys["RS256"], "rsa-1", "RS256"), _jwk(keys["ES256"], "ec-1", "ES256")]}
    return TokenVerifier.from_jwks(jwks, algorithms=["RS256", "ES256"], issuer=ISS, audience=AUD)


def test_jwks_selects_the_key_by_kid(jwks_verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    for kid, alg in (("rsa-1", "RS256"), ("ec-1", "ES256")):
        token = jwt.encode(_claims(), keys[alg], algorithm=alg, headers={"kid": kid})
        assert jwks_verifier.verify(token).subject == "alice"


def test_jwks_kid_pointing_at_another_key_fails(jwks_verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    token = jwt.encode(_claims(), keys["ES256"], algorithm="ES256", headers={"kid": "rsa-1"})
    assert "not allowed" in _reason(jwks_verifier, token)


@pytest.mark.parametrize("headers", [{"kid": "nope"}, None])
def test_jwks_unknown_or_missing_kid_fails(
    jwks_verifier: TokenVerifier, keys: dict[str, Any], headers: dict[str, str] | None
) -> None:
    token = jwt.encode(_claims(), keys["ES256"], algorithm="ES256", headers=headers)
    assert "unknown key" in _reason(jwks_verifier, token)


def test_jwks_refuses_symmetric_keys() -> None:
    jwks = {"keys": [{"kty": "oct", "k": _b64(b"s" * 32), "kid": "x"}]}
    with pytest.raises(ValueError, match="symmetric"):
        TokenVerifier.from_jwks(jwks, algorithms=["HS256"], issuer=ISS, audience=AUD)


def test_jwks_file_from_settings(tmp_path: Path, keys: dict[str, Any]) -> None:
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [_jwk(keys["EdDSA"], "ed-1", "EdDSA")]}))
    settings = Settings(
        data_dir=str(tmp_path), auth=AuthSettings(issuer=ISS, audience=AUD, jwks_file=str(jwks_file))
    )
    token = jwt.encode(_claims(), keys["EdDSA"], algorithm="EdDSA", headers={"kid": "ed-1"})
    assert TokenVerifier.from_settings(settings).verify(token).tenant == "acme"


# ── HS256 development mode ─────────────────────────────────────────────────────────────────────────────────


def _hs_settings(tmp_path: Path, secret: bytes) -> Settings:
    secret_file = tmp_path / "hs.secret"
    secret_file.write_bytes(secret)
    auth = AuthSettings(issuer=ISS, audience=AUD, algorithms=["HS256"], hs256_secret_file=str(secret_file))
    return Settings(data_dir=str(tmp_path), auth=auth)


def test_hs256_dev_mode_round_trip(tmp_path: Path) -> None:
    settings = _hs_settings(tmp_path, b"0123456789abcdef0123456789abcdef\n")
    token = mint_dev_token(settings, sub="dev", org=None, scope="chat", ttl_seconds=60)
    principal = TokenVerifier.from_settings(settings).verify(token)
    assert (principal.subject, principal.tenant, principal.scopes) == ("dev", "dev", frozenset({"chat"}))


@pytest.mark.parametrize("secret", [b"short", b"-----BEGIN PUBLIC KEY-----\n" + b"A" * 64])
def test_hs256_rejects_weak_or_pem_secrets(tmp_path: Path, secret: bytes) -> None:
    with pytest.raises(ValueError, match="hs256_secret_file"):
        TokenVerifier.from_settings(_hs_settings(tmp_path, secret))


# ── minting, dev keys, TTLs ────────────────────────────────────────────────────────────────────────────────


def test_dev_keys_and_dev_token(tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"), auth=AuthSettings(issuer=ISS, audience=AUD))
    created = ensure_dev_keys(settings)
    keys_dir = tmp_path / "data" / "keys"
    assert {p.name for p in created.created} == {"jwt-private.pem", "jwt-public.pem", "audit.key"}
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    for path in created.created:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len((keys_dir / "audit.key").read_bytes()) == 32
    before = (keys_dir / "jwt-private.pem").read_bytes()
    assert ensure_dev_keys(settings).created == ()
    assert (keys_dir / "jwt-private.pem").read_bytes() == before
    token = mint_dev_token(settings, sub="ops", org="bank", scope=["admin"], ttl_seconds=60)
    principal = TokenVerifier.from_settings(settings).verify(token)
    assert principal.is_admin and principal.tenant == "bank"


def test_master_key_made_only_when_encryption_is_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_MASTER_KEY", raising=False)
    settings = Settings(data_dir=str(tmp_path), privacy=PrivacySettings(encrypt_at_rest=True))
    made = ensure_dev_keys(settings)
    assert made.master_key is not None and len(made.master_key.read_bytes()) == 32
    off = Settings(data_dir=str(tmp_path / "off"))
    assert ensure_dev_keys(off).master_key is None


@pytest.mark.parametrize(("kind", "alg"), [("ed25519", "EdDSA"), ("rsa", "RS256"), ("ec", "ES256")])
def test_generated_keypairs_sign_and_verify(tmp_path: Path, kind: Any, alg: str) -> None:
    private, public = generate_keypair(kind, tmp_path / "out")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    token = mint_token(
        private.read_bytes(),
        sub="s",
        org="o",
        scope="chat",
        ttl_seconds=60,
        issuer=ISS,
        audience=AUD,
        algorithm=alg,
    )
    verifier = TokenVerifier.from_pem(public.read_bytes(), algorithms=[alg], issuer=ISS, audience=AUD)
    assert verifier.verify(token).subject == "s"
    with pytest.raises(FileExistsError):
        generate_keypair(kind, tmp_path / "out")


def test_mint_refuses_an_algorithm_the_key_cannot_make(keys: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="cannot be signed"):
        mint_token(
            keys["EdDSA"], sub="s", scope="chat", ttl_seconds=60, issuer=ISS, audience=AUD, algorithm="RS256"
        )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3600", 3600), ("1h", 3600), ("30m", 1800), ("45s", 45), ("7d", 604800), (" 2H ", 7200)],
)
def test_parse_ttl(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "1w", "-5", "1.5h", "h"])
def test_parse_ttl_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ttl(text)
