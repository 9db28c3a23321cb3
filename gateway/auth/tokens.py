"""Bearer JWT verification (RFC 8725 practice) and dev-token minting.

Rules, each one closing a known hole:
- the accepted algorithms are the configured list intersected with what the key's type can verify
  (RSA: RS*/PS*, EC: the one ES* of its curve, Ed25519/Ed448: EdDSA, HS secret: HS256), fixed at start-up
  and never read from the token; so `alg: none` and HS/RS key confusion (a public key used as an HMAC
  secret) cannot verify;
- JWKS keys come from a local file only and are picked by `kid`; symmetric (`oct`) JWKs are refused;
- exp, iat, sub, iss and aud are required; iss and aud compare exactly (aud may be a list holding ours);
- the tenant is the `org` claim; without one the token is refused (auth.missing_tenant = "reject") or gets
  a tenant of its own, `user:<sub>` ("subject"), which no `org` can equal since an `org` with ':' is refused;
  so `{sub: "acme"}` never lands in organisation acme;
  nbf is honoured; clock skew is `auth.leeway_seconds`;
- unknown `crit` headers and unexpected `typ` values are refused, oversized tokens are not parsed;
- errors say what was wrong (expired, wrong audience, ...) but never echo the token or its claims.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.exceptions import InvalidSubjectError

from gateway.auth.revocations import RevocationList, RevocationListUnreadable
from gateway.core.errors import AuthenticationFailed, GatewayError
from gateway.core.principal import ALL_SCOPES, Principal
from gateway.core.settings import Settings

__all__ = [
    "REQUIRED_CLAIMS",
    "TokenVerifier",
    "VerificationKey",
    "algorithms_for_key",
    "mint_dev_token",
    "mint_token",
    "parse_ttl",
]

log = structlog.get_logger(__name__)

REQUIRED_CLAIMS = ("exp", "iat", "sub", "iss", "aud")
MAX_TOKEN_CHARS = 8192
MIN_HS256_SECRET_BYTES = 32  # RFC 7518 §3.2: the key must be at least as long as the hash output.
ALLOWED_TYP = {"jwt", "at+jwt", "application/jwt", "application/at+jwt"}
_RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_ALGORITHM_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_IDENTITY_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,256}$")
_ORG_RE = re.compile(r"^[^\x00-\x1f\x7f:]{1,256}$")  # ':' is kept for the `user:<sub>` namespace
SUBJECT_TENANT_PREFIX = "user:"


def algorithms_for_key(key: Any) -> tuple[str, ...]:
    """The JWS algorithms a key can verify (or sign with); bytes mean an HMAC secret."""
    if isinstance(key, bytes):
        return ("HS256",)
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        alg = _EC_ALGORITHM_BY_CURVE.get(key.curve.name)
        return (alg,) if alg else ()
    if isinstance(
        key,
        ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey | ed448.Ed448PublicKey | ed448.Ed448PrivateKey,
    ):
        return ("EdDSA",)
    return ()


def _bind_algorithms(key: Any, configured: Iterable[str], what: str) -> tuple[str, ...]:
    fits = algorithms_for_key(key)
    chosen = tuple(alg for alg in configured if alg in fits)
    if not chosen:
        raise ValueError(
            f"auth.algorithms {list(configured)} cannot be used with {what}; it verifies only {list(fits)}"
        )
    return chosen


def _load_public_pem(data: bytes) -> Any:
    if b"-----BEGIN CERTIFICATE-----" in data:
        return x509.load_pem_x509_certificate(data).public_key()
    try:
        return serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError("auth.public_key_file is not a PEM public key or certificate") from exc


def _read_hs256_secret(path: Path) -> bytes:
    secret = path.read_bytes().strip(b"\r\n")
    if secret.lstrip().startswith(b"-----BEGIN"):
        raise ValueError("auth.hs256_secret_file holds a PEM key, not a shared secret")
    if len(secret) < MIN_HS256_SECRET_BYTES:
        raise ValueError(f"auth.hs256_secret_file must hold at least {MIN_HS256_SECRET_BYTES} bytes")
    return secret


@dataclass(frozen=True)
class VerificationKey:
    material: Any  # cryptography public key, PyJWK, or HMAC secret bytes
    algorithms: tuple[str, ...]


class TokenVerifier:
    """Turns a Bearer token into a Principal, or raises AuthenticationFailed."""

    def __init__(
        self,
        keys: Mapping[str | None, VerificationKey],
        *,
        issuer: str,
        audience: str,
        leeway_seconds: int = 30,
        revocations: RevocationList | None = None,
        missing_tenant: str = "reject",
    ) -> None:
        if missing_tenant not in ("reject", "subject"):
            raise ValueError(f"missing_tenant must be reject or subject, not {missing_tenant!r}")
        self._missing_tenant = missing_tenant
        if not keys:
            raise ValueError("no verification key configured")
        self._revocations = revocations
        self._keys = dict(keys)
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_seconds

    @classmethod
    def from_pem(cls, pem: bytes, *, algorithms: Iterable[str], **kw: Any) -> TokenVerifier:
        key = _load_public_pem(pem)
        algs = _bind_algorithms(key, algorithms, type(key).__name__)
        return cls({None: VerificationKey(key, algs)}, **kw)

    @classmethod
    def from_hs256_secret(cls, secret: bytes, *, algorithms: Iterable[str], **kw: Any) -> TokenVerifier:
        algs = _bind_algorithms(secret, algorithms, "an HS256 secret")
        return cls({None: VerificationKey(secret, algs)}, **kw)

    @classmethod
    def from_jwks(cls, jwks: Mapping[str, Any], *, algorithms: Iterable[str], **kw: Any) -> TokenVerifier:
        configured = list(algorithms)
        keys: dict[str | None, VerificationKey] = {}
        for entry in jwks.get("keys", []):
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            if entry.get("kty") == "oct":
                raise ValueError("auth.jwks_file holds a symmetric (oct) key; use hs256_secret_file for that")
            kid = entry.get("kid")
            if not isinstance(kid, str) or not kid:
                raise ValueError("every key in auth.jwks_file needs a `kid`")
            if kid in keys:
                raise ValueError(f"auth.jwks_file has two keys with kid {kid!r}")
            jwk = jwt.PyJWK.from_dict(entry)
            # A PyJWK verifies with exactly one algorithm (its `alg`, or the one its type implies).
            if jwk.algorithm_name not in _bind_algorithms(jwk.key, configured, f"JWK {kid!r}"):
                raise ValueError(f"JWK {kid!r} uses {jwk.algorithm_name}, not in auth.algorithms")
            keys[kid] = VerificationKey(jwk, (jwk.algorithm_name,))
        return cls(keys, **kw)

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        auth = settings.auth
        kw: dict[str, Any] = {
            "algorithms": auth.algorithms,
            "issuer": auth.issuer,
            "audience": auth.audience,
            "leeway_seconds": auth.leeway_seconds,
            "missing_tenant": auth.missing_tenant,
            "revocations": RevocationList(
                settings.key_path(auth.revocation_file, "revoked-tokens.json"),
                leeway_seconds=auth.leeway_seconds,
            ),
        }
        if auth.hs256_secret_file:
            return cls.from_hs256_secret(_read_hs256_secret(Path(auth.hs256_secret_file)), **kw)
        if auth.jwks_file:
            return cls.from_jwks(json.loads(Path(auth.jwks_file).read_text()), **kw)
        return cls.from_pem(settings.key_path(auth.public_key_file, "jwt-public.pem").read_bytes(), **kw)

    def _select_key(self, header: Mapping[str, Any]) -> VerificationKey:
        kid = header.get("kid")
        if None in self._keys:  # a single configured key: `kid` is informational
            return self._keys[None]
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        if not isinstance(kid, str) or kid not in self._keys:
            raise AuthenticationFailed("token was signed by an unknown key")
        return self._keys[kid]

    def verify(self, token: str) -> Principal:
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise AuthenticationFailed("malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationFailed("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise AuthenticationFailed("unsigned tokens are not accepted")
        if "crit" in header:
            raise AuthenticationFailed("token uses critical header extensions this gateway does not support")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in ALLOWED_TYP):
            raise AuthenticationFailed("token type is not an access token")
        key = self._select_key(header)
        if alg not in key.algorithms:
            raise AuthenticationFailed("token algorithm is not allowed for the configured key")
        claims = self._decode(token, key)
        if self._revocations is not None and self._is_revoked(claims):
            raise AuthenticationFailed("token has been revoked")
        return self._principal(claims)

    def _is_revoked(self, claims: Mapping[str, Any]) -> bool:
        assert self._revocations is not None
        try:
            return self._revocations.is_revoked(claims)
        except RevocationListUnreadable as exc:  # fail closed: an unreadable list must not undo revocations
            log.error("auth.revocation_list_unreadable", error=str(exc))
            raise GatewayError(
                "this gateway cannot read its token revocation list; its operator must fix it"
            ) from None

    def _decode(self, token: str, key: VerificationKey) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.material,
                algorithms=list(key.algorithms),
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": list(REQUIRED_CLAIMS)},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationFailed("token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthenticationFailed("token is not valid yet (nbf/iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationFailed("token audience does not match this gateway") from None
        except jwt.InvalidIssuerError:
            raise AuthenticationFailed("token issuer is not trusted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationFailed(f"token lacks the required '{exc.claim}' claim") from None
        except jwt.InvalidSignatureError:
            raise AuthenticationFailed("token signature is invalid") from None
        except jwt.InvalidAlgorithmError:
            raise AuthenticationFailed("token algorithm is not allowed for the configured key") from None
        except (jwt.InvalidIssuedAtError, InvalidSubjectError):
            raise AuthenticationFailed("token has an invalid 'iat' or 'sub' claim") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise AuthenticationFailed("malformed token") from None
        return claims

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        subject = claims.get("sub")
        if not isinstance(subject, str) or not _IDENTITY_RE.match(subject):
            raise AuthenticationFailed("token has an invalid 'sub' claim")
        tenant = claims.get("org")
        if tenant is None:
            if self._missing_tenant == "reject":
                raise AuthenticationFailed("token lacks the required 'org' (tenant) claim")
            tenant = SUBJECT_TENANT_PREFIX + subject
        elif not isinstance(tenant, str) or not _ORG_RE.match(tenant):
            raise AuthenticationFailed("token has an invalid 'org' claim")
        raw_scope = claims.get("scope", "")
        if not isinstance(raw_scope, str):
            raise AuthenticationFailed("token 'scope' claim must be a space-separated string")
        scopes = frozenset(raw_scope.split()) & ALL_SCOPES
        return Principal(subject=subject, tenant=tenant, scopes=scopes)


def parse_ttl(text: str) -> int:
    """'90s', '30m', '1h', '7d' or plain seconds '3600' -> seconds (> 0)."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text.lower())
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 3600, 30m, 1h, 7d)")
    seconds = int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    if seconds <= 0:
        raise ValueError("duration must be positive")
    return seconds


def _load_signing_key(key: Any) -> Any:
    if isinstance(key, str):
        key = key.encode()
    if isinstance(key, bytes) and key.lstrip().startswith(b"-----BEGIN"):
        return serialization.load_pem_private_key(key, password=None)
    return key


def mint_token(
    private_key_or_secret: Any,
    *,
    sub: str,
    org: str | None = None,
    scope: str | Iterable[str],
    ttl_seconds: int,
    issuer: str,
    audience: str,
    algorithm: str,
    kid: str | None = None,
) -> str:
    """Sign a token the verifier accepts (dev CLI and tests). The key is a PEM/key object or HS secret."""
    key = _load_signing_key(private_key_or_secret)
    if algorithm not in algorithms_for_key(key):
        fits = list(algorithms_for_key(key))
        raise ValueError(f"{algorithm} cannot be signed with this key; it fits {fits}")
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": sub,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_seconds,
        "jti": uuid.uuid4().hex,
        "scope": scope if isinstance(scope, str) else " ".join(scope),
    }
    if org is not None:
        claims["org"] = org
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


def _jwks_kid_for(settings: Settings, private_key: Any) -> str | None:
    """The `kid` of the configured JWKS entry matching this private key, so minted tokens select it."""
    if not settings.auth.jwks_file:
        return None
    wanted = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for entry in json.loads(Path(settings.auth.jwks_file).read_text()).get("keys", []):
        with_key = jwt.PyJWK.from_dict(entry).key
        if hasattr(with_key, "public_bytes") and wanted == with_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            return str(entry.get("kid"))
    raise ValueError("the dev signing key is not in auth.jwks_file")


def mint_dev_token(
    settings: Settings, *, sub: str, org: str | None, scope: str | Iterable[str], ttl_seconds: int
) -> str:
    """`gateway token`: sign with the configured dev key and the first configured algorithm that fits it.

    Without an org the token names its subject as its tenant (org = sub), as the dev CLI always did."""
    auth = settings.auth
    if org is None:
        org = sub
    kid: str | None = None
    if auth.hs256_secret_file:
        key: Any = _read_hs256_secret(Path(auth.hs256_secret_file))
    else:
        key = _load_signing_key(settings.key_path(auth.private_key_file, "jwt-private.pem").read_bytes())
        kid = _jwks_kid_for(settings, key)
    algorithm = _bind_algorithms(key, auth.algorithms, "the dev signing key")[0]
    return mint_token(
        key,
        sub=sub,
        org=org,
        scope=scope,
        ttl_seconds=ttl_seconds,
        issuer=auth.issuer,
        audience=auth.audience,
        algorithm=algorithm,
        kid=kid,
    )
