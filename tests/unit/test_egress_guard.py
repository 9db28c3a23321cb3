"""The conftest egress guard blocks outside addresses and lets loopback through."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from tests import conftest


@pytest.fixture
def forget_attempts() -> Iterator[None]:
    """These tests provoke blocked attempts on purpose; don't fail them at teardown for it."""
    yield
    conftest._attempts.clear()


@pytest.mark.parametrize("address", [("10.0.0.1", 443), ("8.8.8.8", 53), ("203.0.113.5", 80)])
def test_outside_connects_are_blocked(address: tuple[str, int], forget_attempts: None) -> None:
    with socket.socket() as sock, pytest.raises(conftest.EgressBlocked):
        sock.connect(address)
    with socket.socket() as sock, pytest.raises(conftest.EgressBlocked):
        sock.connect_ex(address)
    with pytest.raises(conftest.EgressBlocked):
        socket.create_connection(address, timeout=0.1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, pytest.raises(conftest.EgressBlocked):
        udp.sendto(b"x", address)


def test_outside_names_are_not_even_resolved(forget_attempts: None) -> None:
    with pytest.raises(conftest.EgressBlocked):
        socket.getaddrinfo("huggingface.co", 443)

    async def lookup() -> None:
        await asyncio.get_running_loop().getaddrinfo("pypi.org", 443)

    with pytest.raises(conftest.EgressBlocked):
        asyncio.run(lookup())


def test_a_swallowed_attempt_is_still_recorded(forget_attempts: None) -> None:
    # Code under test that hides the error must not hide the attempt.
    with contextlib.suppress(Exception):
        socket.create_connection(("192.0.2.1", 80), timeout=0.1)
    assert conftest._attempts


def test_loopback_works() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        accepted = threading.Thread(target=lambda: server.accept()[0].close())
        accepted.start()
        with socket.create_connection(("localhost", port), timeout=2):
            pass
        accepted.join(timeout=2)
