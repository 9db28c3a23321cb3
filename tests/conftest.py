"""Shared test setup.

Section 1, the egress guard: nothing in the test run may reach past this machine.  Any connect (TCP or UDP,
sync or asyncio, via create_connection or a raw socket) or name lookup aimed at an address other than
loopback or a Unix socket raises EgressBlocked, and the test that tried fails at teardown even if the code
under test swallowed the exception.  Subprocesses (the e2e server) are not covered by this in-process patch.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest

# ── Section 1: egress guard ─────────────────────────────────────────────────────────────────────────────────

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
_BIND_ONLY = {"", "0.0.0.0", "::"}  # wildcard addresses: fine to look up for bind(), never to connect to
_attempts: list[str] = []


class EgressBlocked(RuntimeError):
    """Raised on any attempt to reach a non-loopback address during tests."""


def _is_local_host(host: Any) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    if host.lower().rstrip(".") in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _check_address(family: int, address: Any) -> None:
    if family == getattr(socket, "AF_UNIX", None):
        return
    host = address[0] if isinstance(address, tuple) and address else address
    if not _is_local_host(host):
        _attempts.append(repr(host))
        raise EgressBlocked(f"test tried to reach {host!r}; only loopback is allowed")


@pytest.fixture(scope="session", autouse=True)
def egress_guard() -> Iterator[None]:
    originals = {
        "connect": socket.socket.connect,
        "connect_ex": socket.socket.connect_ex,
        "sendto": socket.socket.sendto,
        "create_connection": socket.create_connection,
        "getaddrinfo": socket.getaddrinfo,
    }

    def connect(self: socket.socket, address: Any) -> None:
        _check_address(self.family, address)
        return originals["connect"](self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        _check_address(self.family, address)
        return int(originals["connect_ex"](self, address))

    def sendto(self: socket.socket, data: Any, *args: Any) -> int:
        _check_address(self.family, args[-1])  # sendto(data, address) or sendto(data, flags, address)
        return int(originals["sendto"](self, data, *args))

    def create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        _check_address(socket.AF_INET, address)
        return originals["create_connection"](address, *args, **kwargs)  # type: ignore[no-any-return]

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        # A DNS lookup of an outside name already leaks it; loopback names and wildcards resolve locally.
        if host is not None and host not in _BIND_ONLY and not _is_local_host(host):
            _attempts.append(repr(host))
            raise EgressBlocked(f"test tried to resolve {host!r}; only loopback is allowed")
        return originals["getaddrinfo"](host, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.socket.sendto = sendto  # type: ignore[method-assign,assignment]
    socket.create_connection = create_connection  # type: ignore[assignment]
    socket.getaddrinfo = getaddrinfo
    try:
        yield
    finally:
        socket.socket.connect = originals["connect"]  # type: ignore[method-assign]
        socket.socket.connect_ex = originals["connect_ex"]  # type: ignore[method-assign]
        socket.socket.sendto = originals["sendto"]  # type: ignore[method-assign]
        socket.create_connection = originals["create_connection"]  # type: ignore[assignment]
        socket.getaddrinfo = originals["getaddrinfo"]


@pytest.fixture(autouse=True)
def _fail_on_egress_attempt(egress_guard: None) -> Iterator[None]:
    """Fail the test that tried to reach out, even if the code under test caught EgressBlocked."""
    _attempts.clear()
    yield
    if _attempts:
        attempts = ", ".join(_attempts)
        _attempts.clear()
        pytest.fail(f"network egress attempted: {attempts}", pytrace=False)


# ── Section 2: shared fixtures (the lead adds app/client fixtures here) ─────────────────────────────────────
