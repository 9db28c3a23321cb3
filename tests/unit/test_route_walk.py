"""Walk every route the real app registers (create_app, fake engine) and prove default-deny on each.

The walk reads app.routes, so a route another module adds later is covered without editing this file.  It
runs once per `auth.metrics_access` mode and calling peer (loopback or another machine):
- no token -> 401, `WWW-Authenticate: Bearer`, OpenAI error envelope; except the open set, which is found
  by calling every route without a token (not by trusting the handlers' `public` mark) and pinned exactly:
  /healthz and /readyz, plus /metrics in `public` mode and, in `loopback` mode, for a loopback peer only.
  A new open route is a deliberate change to this test;
- a garbage token -> 401;
- a token with every scope but the one a handler needs -> 403; with only that scope -> neither 401 nor 403;
  admin -> neither.  A handler that names no scope (Litestar's automatic OPTIONS handlers included) needs
  admin.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.routes import HTTPRoute
from litestar.testing import TestClient

from gateway.app import create_app, litestar_of
from gateway.auth.keys import ensure_dev_keys
from gateway.auth.tokens import mint_dev_token
from gateway.core.principal import ALL_SCOPES
from gateway.core.settings import AuthSettings, LimitSettings, Settings
from tests.unit.fake_engine import FakeEngine
from tests.unit.peer import REMOTE, Peer

ALWAYS_PUBLIC = {("GET", "/healthz"), ("GET", "/readyz")}
_PARAM = re.compile(r"\{(\w+)(?::(\w+))?\}")
_PARAM_VALUES = {"int": "987654321", "uuid": str(uuid.uuid4()), "path": "walk/missing"}


@dataclass(frozen=True)
class Endpoint:
    method: str
    template: str
    path: str
    needs: str  # the scope the handler requires; "admin" when it names none (or an unknown one)

    def __str__(self) -> str:
        return f"{self.method} {self.template}"


def _concrete(template: str) -> str:
    # Ids that exist nowhere: handlers answer 404/400, never a business-rule 403 (e.g. "base model").
    return _PARAM.sub(
        lambda m: _PARAM_VALUES.get(m.group(2) or "str", f"walk-missing-{m.group(1)}"), template
    )


def endpoints(app: Litestar) -> list[Endpoint]:
    found = []
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for method, entry in route.route_handler_map.items():
            handler = entry[0] if isinstance(entry, tuple) else entry
            scope = handler.opt.get("scope")
            needs = scope if isinstance(scope, str) and scope in ALL_SCOPES else "admin"
            found.append(Endpoint(method, route.path, _concrete(route.path), needs))
    return sorted(found, key=str)


@dataclass
class Walk:
    client: TestClient[Any]
    settings: Settings
    metrics_open: bool  # /metrics answers this walk's peer without a token
    endpoints: list[Endpoint]
    public: set[Endpoint] = field(default_factory=set)  # those that answered a tokenless call with no 401

    def token(self, scopes: set[str] | frozenset[str], sub: str = "walker") -> dict[str, str]:
        token = mint_dev_token(self.settings, sub=sub, org="walk-org", scope=sorted(scopes), ttl_seconds=300)
        return {"Authorization": f"Bearer {token}"}

    def call(self, endpoint: Endpoint, headers: dict[str, str] | None = None) -> Any:
        return self.client.request(endpoint.method, endpoint.path, headers=headers or {})

    def protected(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e not in self.public]


# (auth.metrics_access, the peer the walk calls from, whether /metrics is open to it)
WALKS = [
    ("loopback", REMOTE, False),
    ("loopback", "127.0.0.1", True),
    ("token", "127.0.0.1", False),
    ("public", REMOTE, True),
]


def _walk(tmp_path: Path, access: str, peer: str, metrics_open: bool) -> Iterator[Walk]:
    settings = Settings(
        data_dir=str(tmp_path / "data"),
        auth=AuthSettings(metrics_access=access),
        # the walk sends hundreds of requests, most of them refused without a token
        limits=LimitSettings(requests_per_minute=0, unauthenticated_per_minute=0),
    )
    ensure_dev_keys(settings)
    app = create_app(settings, engines={"smollm2-135m-instruct": FakeEngine()})
    litestar_app = litestar_of(app)
    with TestClient(Peer(app, peer)) as client:
        walk = Walk(client, settings, metrics_open, endpoints(litestar_app))
        walk.public = {e for e in walk.endpoints if walk.call(e).status_code != 401}
        yield walk


@pytest.fixture(scope="module", params=WALKS, ids=[f"{access}-from-{peer}" for access, peer, _ in WALKS])
def walk(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    yield from _walk(tmp_path_factory.mktemp("walk"), *request.param)


def _assert_envelope(response: Any) -> None:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert error["code"] is None or isinstance(error["code"], str)


def test_the_walk_sees_the_known_routes(walk: Walk) -> None:
    seen = {(e.method, e.template) for e in walk.endpoints}
    expected = {
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/{model_id:str}"),
        ("DELETE", "/v1/models/{model_id:str}"),
        ("GET", "/v1/audit"),
    }
    assert expected <= seen
    assert {e.method for e in walk.endpoints if e.template == "/v1/chat/completions"} == {"POST", "OPTIONS"}


def test_public_routes_are_exactly_the_expected_ones(walk: Walk) -> None:
    public = {(e.method, e.template) for e in walk.public}
    expected = set(ALWAYS_PUBLIC)
    if walk.metrics_open:
        expected.add(("GET", "/metrics"))
    assert public == expected
    for endpoint in walk.public:
        assert walk.call(endpoint).status_code not in (401, 403), endpoint


def test_every_other_route_refuses_a_missing_token(walk: Walk) -> None:
    failures = []
    for endpoint in walk.protected():
        response = walk.call(endpoint)
        if response.status_code != 401 or response.headers.get("www-authenticate") != "Bearer":
            failures.append(f"{endpoint}: {response.status_code} {response.headers.get('www-authenticate')}")
            continue
        _assert_envelope(response)
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert not failures, failures


@pytest.mark.parametrize(
    "authorization",
    ["Bearer garbage", "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "Basic d2Fsazp3YWxr", "Bearer"],
)
def test_every_other_route_refuses_a_garbage_token(walk: Walk, authorization: str) -> None:
    failures = []
    for endpoint in walk.protected():
        response = walk.call(endpoint, {"Authorization": authorization})
        if response.status_code != 401 or not response.headers.get("www-authenticate", "").startswith(
            "Bearer"
        ):
            failures.append(f"{endpoint}: {response.status_code}")
            continue
        _assert_envelope(response)
    assert not failures, failures


def test_scope_matrix(walk: Walk) -> None:
    """Every scope but the needed one -> 403; the needed one alone -> through the guard; admin likewise."""
    failures = []
    for endpoint in walk.protected():
        others = ALL_SCOPES - {endpoint.needs, "admin"}
        denied = walk.call(endpoint, walk.token(others))
        if denied.status_code != 403:
            failures.append(f"{endpoint} with {sorted(others)}: {denied.status_code}, expected 403")
        else:
            _assert_envelope(denied)
            assert denied.json()["error"]["code"] == "insufficient_scope"
        for scopes in ({endpoint.needs}, {"admin"}):
            allowed = walk.call(endpoint, walk.token(scopes))
            if allowed.status_code in (401, 403) or allowed.status_code >= 500:
                failures.append(
                    f"{endpoint} with {sorted(scopes)}: {allowed.status_code} {allowed.text[:200]}"
                )
    assert not failures, "\n".join(failures)


def test_each_single_scope_reaches_only_its_own_routes(walk: Walk) -> None:
    """The other direction of the matrix: a one-scope token gets 403 everywhere it is not needed."""
    failures = []
    for scope in sorted(ALL_SCOPES - {"admin"}):
        headers = walk.token({scope}, sub=f"only-{scope}")
        for endpoint in walk.protected():
            status = walk.call(endpoint, headers).status_code
            if (endpoint.needs == scope) != (status not in (401, 403)):
                failures.append(f"{endpoint} with only {scope}: {status}")
    assert not failures, "\n".join(failures)
