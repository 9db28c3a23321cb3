"""Default-deny guard and limits, on a tiny Litestar app wrapped in the real AuditMiddleware."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from litestar import Litestar, Request, get
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.testing import TestClient

from gateway.api.errors import EXCEPTION_HANDLERS
from gateway.audit.log import AuditLog
from gateway.audit.middleware import AuditMiddleware
from gateway.auth.guards import Gate, provide_principal
from gateway.auth.limits import ConcurrencyLimiter, RateLimiter
from gateway.auth.tokens import TokenVerifier
from gateway.core.principal import Principal

ISS, AUD = "iss-test", "aud-test"
SIGNING_KEY = ed25519.Ed25519PrivateKey.generate()


def token(scope: str, *, sub: str = "alice", org: str = "acme", **claims: Any) -> str:
    now = int(time.time())
    body = {
        "iss": ISS,
        "aud": AUD,
        "sub": sub,
        "org": org,
        "iat": now,
        "exp": now + 60,
        "scope": scope,
        **claims,
    }
    return jwt.encode(body, SIGNING_KEY, algorithm="EdDSA")


def bearer(scope: str, **kw: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(scope, **kw)}"}


@get("/public", opt={"public": True, "action": "test.public"})
async def public_handler() -> dict[str, bool]:
    return {"ok": True}


@get("/chat", opt={"scope": "chat", "action": "test.chat"})
async def chat_handler(
    request: Request[Any, Any, Any], principal: NamedDependency[Principal]
) -> dict[str, Any]:
    in_flight = request.app.state["gate"].concurrency.in_flight(principal.tenant)
    return {"sub": principal.subject, "tenant": principal.tenant, "in_flight": in_flight}


@get("/forgotten", opt={"action": "test.forgotten"})  # neither public nor scoped: admins only
async def forgotten_handler() -> dict[str, bool]:
    return {"ok": True}


@get("/typo", opt={"scope": "chats"})  # an unknown scope nobody holds: admins only, in effect
async def typo_handler() -> dict[str, bool]:
    return {"ok": True}


@dataclass
class Harness:
    client: TestClient[Any]
    audit: AuditLog
    gate: Gate

    def records(self) -> list[dict[str, Any]]:
        return self.audit.read_page(1, 1000)  # after the chain's first record


def build(tmp_path: Path, *, auth_enabled: bool = True, rpm: int = 600, concurrency: int = 32) -> Harness:
    public_pem = SIGNING_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    verifier = TokenVerifier.from_pem(public_pem, algorithms=["EdDSA"], issuer=ISS, audience=AUD)
    gate = Gate(
        verifier if auth_enabled else None,
        rate=RateLimiter(rpm),
        concurrency=ConcurrencyLimiter(concurrency),
    )
    app = Litestar(
        route_handlers=[public_handler, chat_handler, forgotten_handler, typo_handler],
        guards=gate.guards,
        dependencies={"principal": Provide(provide_principal, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,
        state=State({"gate": gate}),
        openapi_config=None,
    )
    audit = AuditLog(tmp_path / "audit" / "audit.jsonl", b"k" * 32)
    return Harness(TestClient(AuditMiddleware(app, audit)), audit, gate)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = build(tmp_path)
    with h.client:
        yield h
    h.audit.close()


def test_public_handler_needs_no_token(harness: Harness) -> None:
    assert harness.client.get("/public").json() == {"ok": True}


def test_missing_token_is_401_with_bearer_challenge(harness: Harness) -> None:
    response = harness.client.get("/chat")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert harness.records()[-1]["outcome"] == "denied"


@pytest.mark.parametrize(
    ("authorization", "challenge"),
    [
        ("Bearer not-a-jwt", 'Bearer error="invalid_token"'),
        ("Basic YWxpY2U6c2VjcmV0", 'Bearer error="invalid_request"'),
        ("Bearer", 'Bearer error="invalid_request"'),
        ("Bearer a b", 'Bearer error="invalid_request"'),
    ],
)
def test_bad_credentials_are_401(harness: Harness, authorization: str, challenge: str) -> None:
    response = harness.client.get("/chat", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == challenge
    assert "not-a-jwt" not in response.text


def test_expired_token_says_so(harness: Harness) -> None:
    expired = token("chat", exp=int(time.time()) - 3600)
    response = harness.client.get("/chat", headers={"Authorization": f"Bearer {expired}"})
    assert response.status_code == 401
    assert "expired" in response.json()["error"]["message"]
    assert expired not in response.text


def test_scope_is_required(harness: Harness) -> None:
    response = harness.client.get("/chat", headers=bearer("models:read"))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "insufficient_scope"
    assert 'scope="chat"' in response.headers["www-authenticate"]
    record = harness.records()[-1]
    assert (record["subject"], record["tenant"], record["outcome"]) == ("alice", "acme", "denied")


def test_principal_reaches_the_handler(harness: Harness) -> None:
    body = harness.client.get("/chat", headers=bearer("chat", sub="bob", org="globex")).json()
    assert (body["sub"], body["tenant"], body["in_flight"]) == ("bob", "globex", 1)


@pytest.mark.parametrize("path", ["/forgotten", "/typo"])
def test_handlers_without_a_usable_scope_are_admin_only(harness: Harness, path: str) -> None:
    every_scope = "models:read chat files:read files:write fine_tuning:read fine_tuning:write"
    assert harness.client.get(path, headers=bearer(every_scope)).status_code == 403
    assert harness.client.get(path).status_code == 401
    assert harness.client.get(path, headers=bearer("admin")).status_code == 200


def test_admin_holds_every_scope(harness: Harness) -> None:
    assert harness.client.get("/chat", headers=bearer("admin")).status_code == 200


def test_auth_disabled_makes_everyone_anonymous_admin(tmp_path: Path) -> None:
    h = build(tmp_path, auth_enabled=False)
    with h.client:
        body = h.client.get("/chat").json()
        assert (body["sub"], body["tenant"]) == ("anonymous", "default")
        assert h.client.get("/forgotten").status_code == 200
    h.audit.close()


def test_rate_limit_per_subject(tmp_path: Path) -> None:
    h = build(tmp_path, rpm=2)
    with h.client:
        for _ in range(2):
            assert h.client.get("/chat", headers=bearer("chat")).status_code == 200
        limited = h.client.get("/chat", headers=bearer("chat"))
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["type"] == "rate_limit_exceeded"
        assert h.client.get("/chat", headers=bearer("chat", sub="carol")).status_code == 200
        assert h.client.get("/public").status_code == 200  # public handlers are not limited
        assert h.client.get("/chat").status_code == 401  # no token: refused before it costs a token
    assert [r["status"] for r in h.records()] == [200, 200, 429, 200, 200, 401]
    assert h.records()[2]["outcome"] == "denied"
    h.audit.close()


def test_tenant_concurrency(tmp_path: Path) -> None:
    h = build(tmp_path, concurrency=1)
    with h.client:
        for _ in range(3):  # sequential requests each release their slot
            assert h.client.get("/chat", headers=bearer("chat")).status_code == 200
        held = h.gate.concurrency.acquire("acme")  # another request of acme's in flight
        busy = h.client.get("/chat", headers=bearer("chat", sub="dave"))
        assert busy.status_code == 429
        assert busy.json()["error"]["code"] == "concurrency_limit_exceeded"
        assert h.client.get("/chat", headers=bearer("chat", org="initech")).status_code == 200
        held.release()
        assert h.client.get("/chat", headers=bearer("chat", sub="dave")).status_code == 200
        assert h.gate.concurrency.in_flight("acme") == 0
    h.audit.close()
