"""gateway/security/egress.py, the guard: allow-list decisions, the patches, nesting, settings, logging.

The session guard from tests/conftest.py stays installed underneath, so a destination this guard lets
through is still stopped before a real connect (and recorded; `forget_attempts` clears it where expected).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.core.settings import PrivacySettings, ServerSettings, Settings, load_settings
from gateway.security.egress import EgressBlocked, EgressGuard, install_from_settings, parse_allow
from tests import conftest


@pytest.fixture
def forget_attempts() -> Iterator[None]:
    yield
    conftest._attempts.clear()


@pytest.fixture
def blocked() -> Iterator[list[str]]:
    seen: list[str] = []
    with EgressGuard(["10.20.0.0/16", "idp.bank.internal", "fd00::/8"], on_block=seen.append):
        yield seen


def _loopback_server() -> tuple[socket.socket, int, threading.Thread]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def accept() -> None:
        conn, _ = server.accept()
        conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return server, int(server.getsockname()[1]), thread


def test_parse_allow_splits_names_and_networks() -> None:
    names, networks = parse_allow(["10.0.0.0/8", " IdP.Example.Internal. ", "192.0.2.7", "[fd00::1]", ""])
    assert names == {"idp.example.internal"}
    assert [str(n) for n in networks] == ["10.0.0.0/8", "192.0.2.7/32", "fd00::1/128"]
    for bad in ["http://idp.internal", "idp internal", "*.internal", "a/b"]:
        with pytest.raises(ValueError, match="egress_allow"):
            parse_allow([bad])


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        (b"127.0.0.1", True),
        ("10.20.3.4", True),  # in the allowed CIDR
        ("10.21.0.1", False),
        ("idp.bank.internal", True),
        ("evil.idp.bank.internal", False),  # exact names only
        ("fd00::5", True),
        ("fe80::1%eth0", False),
        ("::ffff:8.8.8.8", False),
        ("0.0.0.0", False),  # connecting to the wildcard reaches this host on Linux, but never a target
        ("8.8.8.8", False),
        ("huggingface.co", False),
        (None, False),
        (1234, False),
    ],
)
def test_allows_host(host: object, allowed: bool) -> None:
    guard = EgressGuard(["10.20.0.0/16", "idp.bank.internal", "fd00::/8"])
    assert guard.allows_host(host) is allowed


def test_families() -> None:
    guard = EgressGuard()
    assert guard.allows_address(socket.AF_UNIX, "/run/x.sock")
    assert guard.allows_address(socket.AF_INET, ("127.0.0.1", 80))
    assert not guard.allows_address(socket.AF_INET6, ("2001:db8::1", 80, 0, 0))
    assert not guard.allows_address(getattr(socket, "AF_PACKET", 17), ("eth0", 0))


@pytest.mark.parametrize("address", [("10.21.0.1", 443), ("203.0.113.5", 80), ("::ffff:8.8.8.8", 53)])
def test_outside_connects_raise_before_connecting(blocked: list[str], address: tuple[str, int]) -> None:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family) as sock, pytest.raises(EgressBlocked) as info:
        sock.connect(address)
    assert info.value.errno == 1 and isinstance(info.value, PermissionError)
    with socket.socket(family) as sock, pytest.raises(EgressBlocked):
        sock.connect_ex(address)
    with pytest.raises(EgressBlocked):
        socket.create_connection(address, timeout=0.1)
    with socket.socket(family, socket.SOCK_DGRAM) as udp:
        with pytest.raises(EgressBlocked):
            udp.sendto(b"x", address)
        with pytest.raises(EgressBlocked):
            udp.sendto(b"x", 0, address)
        with pytest.raises(EgressBlocked):
            udp.sendmsg([b"x"], [], 0, address)
    assert blocked == [address[0]] * 6
    assert conftest._attempts == []  # this guard refused first: nothing reached the one beneath it


def test_outside_names_are_not_resolved(blocked: list[str]) -> None:
    for lookup in (socket.getaddrinfo, socket.gethostbyname, socket.gethostbyname_ex):
        with pytest.raises(EgressBlocked, match="resolve"):
            lookup("pypi.org", *([443] if lookup is socket.getaddrinfo else []))
    with pytest.raises(EgressBlocked):
        socket.gethostbyaddr("8.8.8.8")  # a PTR query would leave the machine

    async def lookup_async() -> None:
        await asyncio.get_running_loop().getaddrinfo("example.com", 443)

    with pytest.raises(EgressBlocked):
        asyncio.run(lookup_async())
    assert blocked == ["pypi.org"] * 3 + ["8.8.8.8", "example.com"]


def test_asyncio_open_connection_is_blocked(blocked: list[str]) -> None:
    async def connect() -> None:
        await asyncio.open_connection("198.51.100.9", 443)

    with pytest.raises(OSError):  # asyncio may wrap it; the attempt is what counts
        asyncio.run(connect())
    assert blocked == ["198.51.100.9"]


def test_ip_literals_and_wildcards_resolve_without_dns(blocked: list[str]) -> None:
    # uvicorn resolves its bind address; an IP literal sends no query, so it passes (connect is checked).
    assert socket.getaddrinfo("192.0.2.10", 443)[0][4][0] == "192.0.2.10"
    assert socket.getaddrinfo(None, 0, flags=socket.AI_PASSIVE)
    assert socket.getaddrinfo("0.0.0.0", 0)
    with socket.socket() as sock, pytest.raises(EgressBlocked):
        sock.connect(("192.0.2.10", 443))  # a literal looked up is not thereby connectable
    assert blocked == ["192.0.2.10"]


def test_loopback_still_works(blocked: list[str]) -> None:
    server, port, thread = _loopback_server()
    with server:
        with socket.create_connection(("localhost", port), timeout=2):
            pass
        thread.join(timeout=2)
    assert blocked == []


def test_allowed_destinations_pass_this_guard(blocked: list[str], forget_attempts: None) -> None:
    # Passed through to the guard beneath (conftest's), which stops the real connect: proof that the
    # product guard did not refuse it, without a packet leaving.
    with socket.socket() as sock, pytest.raises(EgressBlocked):
        sock.connect(("10.20.3.4", 443))
    assert blocked == [] and conftest._attempts == ["'10.20.3.4'"]


def test_an_allowed_name_makes_its_addresses_connectable(monkeypatch: pytest.MonkeyPatch) -> None:
    answer = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.99.0.7", 443))]

    def fake_lookup(host: object, *args: object, **kwargs: object) -> object:
        return answer  # stands in for DNS: only the allowed name is asked for

    monkeypatch.setattr(socket, "getaddrinfo", fake_lookup)
    guard = EgressGuard(["idp.bank.internal"])
    with guard:
        assert not guard.allows_host("10.99.0.7")
        socket.getaddrinfo("idp.bank.internal", 443)
        assert guard.allows_host("10.99.0.7")
        socket.getaddrinfo("10.99.0.8", 443)  # a literal lookup teaches nothing
        assert not guard.allows_host("10.99.0.8")


def test_uninstall_restores_and_guards_nest() -> None:
    before = (socket.socket.connect, socket.getaddrinfo, socket.create_connection)
    guard = EgressGuard()
    with guard:
        assert guard.installed and socket.socket.connect is not before[0]
        assert guard.install() is guard  # idempotent
    assert (socket.socket.connect, socket.getaddrinfo, socket.create_connection) == before
    assert not guard.installed


def test_block_is_logged_with_the_host_only(blocked: list[str]) -> None:
    with capture_logs() as logs, pytest.raises(EgressBlocked):
        socket.create_connection(("203.0.113.77", 8443), timeout=0.1)
    events = [e for e in logs if e["event"] == "egress.blocked"]
    assert events == [{"event": "egress.blocked", "host": "203.0.113.77", "log_level": "warning"}]


def test_settings_default_on_and_parse_from_env() -> None:
    assert Settings().privacy.block_egress is True and Settings().privacy.egress_allow == []
    settings = load_settings(
        env={
            "GATEWAY_PRIVACY__EGRESS_ALLOW": "10.0.0.0/8, idp.internal",
            "GATEWAY_PRIVACY__BLOCK_EGRESS": "1",
        }
    )
    assert settings.privacy.egress_allow == ["10.0.0.0/8", "idp.internal"]


def test_install_from_settings() -> None:
    off = Settings(privacy=PrivacySettings(block_egress=False))
    assert install_from_settings(off) is None
    guard = install_from_settings(Settings(privacy=PrivacySettings(egress_allow=["10.1.0.0/16"])))
    assert guard is not None
    try:
        assert guard.installed and guard.allows_host("10.1.2.3") and not guard.allows_host("10.2.0.1")
    finally:
        guard.uninstall()
    with pytest.raises(ValueError, match="egress_allow"):
        install_from_settings(Settings(privacy=PrivacySettings(egress_allow=["https://idp"])))


def test_a_bind_host_given_by_name_may_be_resolved() -> None:
    settings = Settings(server=ServerSettings(host="gw.bank.internal"))
    guard = install_from_settings(settings)
    assert guard is not None
    try:
        assert guard.allows_host("gw.bank.internal") and not guard.allows_host("other.bank.internal")
    finally:
        guard.uninstall()
    for literal in ("0.0.0.0", "10.1.2.3", "localhost"):
        guard = install_from_settings(Settings(server=ServerSettings(host=literal)))
        assert guard is not None
        guard.uninstall()
        assert guard.names == frozenset() and guard.networks == ()  # literals need no allow entry


# ── beneath the patches: the audit hook sees what goes around them ──────────────────────────────────────────


def _raw(kind: int) -> contextlib.closing[Any]:
    """A socket of the C class beneath socket.socket, which the patches never touch."""
    import _socket

    return contextlib.closing(_socket.socket(socket.AF_INET, kind))


def test_getnameinfo_is_guarded(blocked: list[str]) -> None:
    with pytest.raises(EgressBlocked, match="resolve"):
        socket.getnameinfo(("203.0.113.9", 443), 0)  # a PTR query would leave the machine
    assert socket.getnameinfo(("203.0.113.9", 443), socket.NI_NUMERICHOST | socket.NI_NUMERICSERV) == (
        "203.0.113.9",
        "443",
    )  # formatting an address sends nothing
    assert socket.getnameinfo(("127.0.0.1", 80), socket.NI_NUMERICSERV)[1] == "80"
    assert blocked == ["203.0.113.9"]


def test_the_unpatched_socket_class_is_refused_too(blocked: list[str]) -> None:
    address = ("203.0.113.5", 80)
    with _raw(socket.SOCK_STREAM) as raw, pytest.raises(EgressBlocked):
        raw.connect(address)
    with _raw(socket.SOCK_STREAM) as raw, pytest.raises(EgressBlocked):
        raw.connect_ex(address)
    with socket.socket() as sock, pytest.raises(EgressBlocked):
        super(socket.socket, sock).connect(address)  # the C method beneath the patched class
    with _raw(socket.SOCK_DGRAM) as udp:
        with pytest.raises(EgressBlocked):
            udp.sendto(b"x", address)
        with pytest.raises(EgressBlocked):
            udp.sendmsg([b"x"], [], 0, address)
    assert blocked == [address[0]] * 5
    assert conftest._attempts == []  # this guard refused first, as with the patches


def test_the_unpatched_lookups_are_refused_too(blocked: list[str]) -> None:
    import _socket

    for lookup, args in [
        (_socket.getaddrinfo, ("pypi.org", 443)),
        (_socket.gethostbyname, ("pypi.org",)),
        (_socket.gethostbyname_ex, ("pypi.org",)),
        (_socket.gethostbyaddr, ("8.8.8.8",)),
        (_socket.getnameinfo, (("8.8.8.8", 53), socket.NI_NUMERICHOST)),  # flags unseen: refused
    ]:
        with pytest.raises(EgressBlocked):
            lookup(*args)
    assert blocked == ["pypi.org"] * 3 + ["8.8.8.8"] * 2
    assert _socket.getaddrinfo("127.0.0.1", 80)[0][4][0] == "127.0.0.1"  # loopback still resolves


def test_the_hook_lets_allowed_destinations_through_and_stops_at_uninstall(forget_attempts: None) -> None:
    seen: list[str] = []
    with EgressGuard(["10.20.0.0/16"], on_block=seen.append):
        with _raw(socket.SOCK_STREAM) as raw, pytest.raises(EgressBlocked):
            raw.connect(("10.20.3.4", 443))
        assert seen == [] and conftest._attempts == ["'10.20.3.4'"]  # refused beneath, by conftest's guard
    conftest._attempts.clear()
    with _raw(socket.SOCK_STREAM) as raw, pytest.raises(EgressBlocked):
        raw.connect(("203.0.113.5", 80))
    assert seen == [] and conftest._attempts == ["'203.0.113.5'"]  # the uninstalled guard no longer asked


def test_loopback_through_the_unpatched_class_still_works(blocked: list[str]) -> None:
    server, port, thread = _loopback_server()
    with server, _raw(socket.SOCK_STREAM) as raw:
        raw.connect(("127.0.0.1", port))
        thread.join(timeout=2)
    assert blocked == []
