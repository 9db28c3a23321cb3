"""The egress guard's lower layer: an audit hook (`sys.addaudithook`, PEP 578) on CPython's socket events.

CPython's socket module raises an audit event inside the C function itself for every connect (and
connect_ex), sendto, sendmsg and name lookup, whoever calls it: the patched `socket.socket` methods, the
unpatched `_socket.socket` class, `super(socket.socket, s).connect(...)`, or a reference to the original
function saved before the patch.  The hook checks those events against every guard installed now, newest
first, and raises the guard's EgressBlocked, which aborts the call before the C code runs.  It sees neither C
code that opens sockets without the socket module (uvloop, libcurl, ctypes) nor child processes.

An audit hook cannot be removed, so one is added per process, on the first install; with no guard installed
it returns at once.  It runs for every audited event in the process (file opens, imports, ...), so anything
that is not one of the seven socket events costs one set lookup.  The hook cannot see getnameinfo's flags:
the patched getnameinfo marks an NI_NUMERICHOST call (no query is sent) with `numeric_lookup()`; one that
reaches the hook unmarked is checked as a reverse lookup.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any, Protocol

__all__ = ["EVENTS", "activate", "deactivate", "numeric_lookup"]

EVENTS = frozenset(
    {
        "socket.connect",  # (socket, address), also for connect_ex
        "socket.sendto",  # (socket, address)
        "socket.sendmsg",  # (socket, address or None)
        "socket.getaddrinfo",  # (host, port, family, type, proto)
        "socket.gethostbyname",  # (host,), also for gethostbyname_ex
        "socket.gethostbyaddr",  # (host,)
        "socket.getnameinfo",  # (sockaddr,)
    }
)


class _Guard(Protocol):
    def check_address(self, family: int, address: Any) -> None: ...

    def check_lookup(self, host: Any, *, reverse: bool = False) -> None: ...


_active: list[_Guard] = []  # oldest first
_lock = threading.Lock()
_hooked = threading.Event()
_numeric = threading.local()


def activate(guard: _Guard) -> None:
    with _lock:
        if not _hooked.is_set():
            sys.addaudithook(_hook)
            _hooked.set()
        _active.append(guard)


def deactivate(guard: _Guard) -> None:
    with _lock:
        if guard in _active:
            _active.remove(guard)


@contextlib.contextmanager
def numeric_lookup() -> Iterator[None]:
    """Around a getnameinfo(..., NI_NUMERICHOST) the patch let through: it only formats the address."""
    _numeric.depth = getattr(_numeric, "depth", 0) + 1
    try:
        yield
    finally:
        _numeric.depth -= 1


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event not in EVENTS or not _active:
        return
    for guard in reversed(_active[:]):
        _check(guard, event, args)


def _check(guard: _Guard, event: str, args: tuple[Any, ...]) -> None:
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        sock, address = args[0], args[1]
        if address is None:  # sendmsg on a connected socket: its connect was checked
            return
        guard.check_address(getattr(sock, "family", -1), address)
    elif event == "socket.gethostbyaddr":
        guard.check_lookup(args[0], reverse=True)
    elif event == "socket.getnameinfo":
        address = args[0]
        if not getattr(_numeric, "depth", 0):
            host = address[0] if isinstance(address, tuple) and address else address
            guard.check_lookup(host, reverse=True)
    else:  # getaddrinfo, gethostbyname
        guard.check_lookup(args[0])
