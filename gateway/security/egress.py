"""In-process egress guard: no outbound connection or name lookup past loopback and an explicit allow-list.

    guard = install_from_settings(settings)    # `gateway serve` and the fine-tuning worker, at start-up

While installed, `socket.socket.connect` / `connect_ex` / `sendto` / `sendmsg`, `socket.create_connection`,
`socket.getaddrinfo`, `gethostbyname(_ex)`, `gethostbyaddr` and `getnameinfo` check the destination first and
raise EgressBlocked (a PermissionError, EPERM, so client libraries treat it as a failed connection) before any
packet leaves: a connect to an outside address, and even the DNS query for an outside name (which would leak
the name).  Allowed: loopback addresses and names, Unix and netlink sockets, the wildcard addresses for bind
lookups, and `privacy.egress_allow` entries (an IP, a CIDR such as 10.20.0.0/16, or an exact host name;
the addresses an allowed name resolves to are allowed from then on; install_from_settings adds
server.host when it is a name, since uvicorn resolves it to bind).  Each refusal is logged as
`egress.blocked` with the host only.  The test suite's guard (tests/conftest.py) is this same class.

Two layers.  The patches above give the clear error and learn the addresses an allowed name resolves to.
Beneath them an audit hook (egress_hook.py) sees the C-level socket events CPython raises for every connect,
send and lookup from any Python code, so a caller that goes around the patched class
(`_socket.socket().connect(...)`, `super(socket.socket, s).connect(...)`, a saved reference to an original
function) is refused too, with the same EgressBlocked.

Limits, stated plainly: both layers are in-process.  They cover the standard library, asyncio's default
event loop and everything built on them (httpx, urllib3, requests, huggingface_hub), but not C code that
opens its own sockets without CPython's socket module (uvloop's transports, gRPC, libcurl, ctypes calling
libc) nor child processes; `gateway serve` therefore runs uvicorn on the asyncio loop while the guard is on,
and the worker installs its own.  A host firewall or a network namespace without a route out is the real
wall; this guard makes a mistake loud on a laptop too.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import structlog

from gateway.core.settings import Settings
from gateway.security import egress_hook as audit_hook

__all__ = ["EgressBlocked", "EgressGuard", "install_from_settings", "parse_allow", "vllm_hosts"]

log = structlog.get_logger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
BIND_ONLY = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 wildcards: looked up for bind(), never connected to
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,62}[a-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
_LOCAL_FAMILIES = frozenset(
    f for f in (getattr(socket, "AF_UNIX", None), getattr(socket, "AF_NETLINK", None)) if f is not None
)
_INET_FAMILIES = frozenset({socket.AF_INET, socket.AF_INET6})
_PATCHED = ("connect", "connect_ex", "sendto", "sendmsg")
_MODULE_PATCHED = (
    "create_connection",
    "getaddrinfo",
    "gethostbyname",
    "gethostbyname_ex",
    "gethostbyaddr",
    "getnameinfo",
)


class EgressBlocked(PermissionError):
    """An outbound connection or lookup aimed past loopback and privacy.egress_allow."""

    def __init__(self, host: str, what: str = "reach") -> None:
        super().__init__(
            errno.EPERM,
            f"egress blocked: tried to {what} {host!r}; "
            "only loopback and privacy.egress_allow may be reached",
        )
        self.host = host


def parse_allow(entries: Iterable[str]) -> tuple[frozenset[str], tuple[IPNetwork, ...]]:
    """Split allow-list entries into exact host names (lower case) and networks; ValueError on nonsense."""
    names: set[str] = set()
    networks: list[IPNetwork] = []
    for raw in entries:
        entry = raw.strip().lower().rstrip(".")
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            continue
        except ValueError:
            pass
        if not _HOSTNAME_RE.match(entry):
            raise ValueError(f"privacy.egress_allow: {raw!r} is neither an IP, a CIDR nor a host name")
        names.add(entry)
    return frozenset(names), tuple(networks)


def _host_text(host: Any) -> str | None:
    if isinstance(host, bytes | bytearray):
        host = bytes(host).decode("ascii", errors="replace")
    return host if isinstance(host, str) else None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class EgressGuard:
    """The allow-list decision plus the socket patches; install() / uninstall() or use it as a context.

    Guards nest: one installed over another calls through to it, so both must allow a destination.
    """

    def __init__(
        self,
        allow: Iterable[str] = (),
        *,
        on_block: Callable[[str], None] | None = None,
    ) -> None:
        self.names, self.networks = parse_allow(allow)
        self._on_block = on_block
        self._resolved: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
        self._lock = threading.Lock()
        self._originals: dict[str, Any] = {}

    # ── decisions ──────────────────────────────────────────────────────────────────────────────────────────

    def allows_host(self, host: Any) -> bool:
        """A name or address we may connect to or resolve."""
        text = _host_text(host)
        if text is None:
            return False
        name = text.lower().rstrip(".")
        if name in LOCAL_NAMES or name in self.names:
            return True
        address = _ip(name)
        if address is None:
            return False
        if address.is_loopback:
            return True
        with self._lock:
            if address in self._resolved:
                return True
        return any(address.version == net.version and address in net for net in self.networks)

    def allows_address(self, family: int, address: Any) -> bool:
        """A socket address (as passed to connect/sendto) we may send to."""
        if family in _LOCAL_FAMILIES:
            return True
        if family not in _INET_FAMILIES:
            return False  # raw, packet, bluetooth, ...: nothing this service should use
        host = address[0] if isinstance(address, tuple) and address else address
        return self.allows_host(host)

    def _refuse(self, host: Any, what: str) -> EgressBlocked:
        shown = (_host_text(host) or repr(host))[:255]
        log.warning("egress.blocked", host=shown)
        if self._on_block is not None:
            self._on_block(shown)
        return EgressBlocked(shown, what)

    def check_address(self, family: int, address: Any) -> None:
        if not self.allows_address(family, address):
            host = address[0] if isinstance(address, tuple) and address else address
            raise self._refuse(host, "reach")

    def check_lookup(self, host: Any, *, reverse: bool = False) -> None:
        """Before a name lookup.  A forward lookup of an IP literal sends nothing (no DNS query), so it
        passes (uvicorn resolves its bind address this way); the connect that may follow is checked."""
        text = _host_text(host)
        if host is None or text in BIND_ONLY or (not reverse and text is not None and _ip(text) is not None):
            return
        if not self.allows_host(host):
            raise self._refuse(host, "resolve")

    def _remember(self, host: Any, infos: Any) -> None:
        """Addresses an allowed *name* resolved to become connectable (create_connection needs that)."""
        name = (_host_text(host) or "").lower().rstrip(".")
        if name not in self.names:
            return
        found = {_ip(str(info[4][0])) for info in infos if isinstance(info, tuple) and len(info) >= 5}
        with self._lock:
            self._resolved.update(a for a in found if a is not None)

    # ── patches ────────────────────────────────────────────────────────────────────────────────────────────

    @property
    def installed(self) -> bool:
        return bool(self._originals)

    def install(self) -> EgressGuard:
        if self._originals:
            return self
        guard = self
        orig = {name: getattr(socket.socket, name) for name in _PATCHED}
        orig.update({name: getattr(socket, name) for name in _MODULE_PATCHED})

        def connect(sock: socket.socket, address: Any) -> None:
            guard.check_address(sock.family, address)
            orig["connect"](sock, address)

        def connect_ex(sock: socket.socket, address: Any) -> int:
            guard.check_address(sock.family, address)
            return int(orig["connect_ex"](sock, address))

        def sendto(sock: socket.socket, data: Any, *args: Any) -> int:
            guard.check_address(sock.family, args[-1])  # sendto(data, address) / sendto(data, flags, address)
            return int(orig["sendto"](sock, data, *args))

        def sendmsg(sock: socket.socket, buffers: Any, *args: Any) -> int:
            if len(args) >= 3 and args[2] is not None:  # sendmsg(buffers, ancdata, flags, address)
                guard.check_address(sock.family, args[2])
            return int(orig["sendmsg"](sock, buffers, *args))

        def create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
            host = address[0] if isinstance(address, tuple) and address else address
            if not guard.allows_host(host):
                raise guard._refuse(host, "reach")
            conn: socket.socket = orig["create_connection"](address, *args, **kwargs)
            return conn

        def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            guard.check_lookup(host)
            infos = orig["getaddrinfo"](host, *args, **kwargs)
            guard._remember(host, infos)
            return infos

        def gethostbyname(host: Any) -> str:
            guard.check_lookup(host)
            return str(orig["gethostbyname"](host))

        def gethostbyname_ex(host: Any) -> Any:
            guard.check_lookup(host)
            return orig["gethostbyname_ex"](host)

        def gethostbyaddr(host: Any) -> Any:
            guard.check_lookup(host, reverse=True)  # a reverse lookup of an outside address asks outside DNS
            return orig["gethostbyaddr"](host)

        def getnameinfo(sockaddr: Any, flags: int) -> Any:
            if flags & socket.NI_NUMERICHOST:  # the address as text: no query is sent
                with audit_hook.numeric_lookup():
                    return orig["getnameinfo"](sockaddr, flags)
            host = sockaddr[0] if isinstance(sockaddr, tuple) and sockaddr else sockaddr
            guard.check_lookup(host, reverse=True)
            return orig["getnameinfo"](sockaddr, flags)

        patches: dict[str, Any] = {
            "connect": connect,
            "connect_ex": connect_ex,
            "sendto": sendto,
            "sendmsg": sendmsg,
            "create_connection": create_connection,
            "getaddrinfo": getaddrinfo,
            "gethostbyname": gethostbyname,
            "gethostbyname_ex": gethostbyname_ex,
            "gethostbyaddr": gethostbyaddr,
            "getnameinfo": getnameinfo,
        }
        for name in _PATCHED:
            setattr(socket.socket, name, patches[name])
        for name in _MODULE_PATCHED:
            setattr(socket, name, patches[name])
        self._originals = orig
        audit_hook.activate(self)
        return self

    def uninstall(self) -> None:
        """Put back what install() replaced (only in tests; a service keeps its guard until exit)."""
        audit_hook.deactivate(self)
        for name in _PATCHED:
            if name in self._originals:
                setattr(socket.socket, name, self._originals[name])
        for name in _MODULE_PATCHED:
            if name in self._originals:
                setattr(socket, name, self._originals[name])
        self._originals = {}

    def __enter__(self) -> EgressGuard:
        return self.install()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.uninstall()


def vllm_hosts(settings: Settings) -> list[str]:
    """The hosts of the configured remote vLLM replicas (vllm.replicas) of vllm-backed models: only these
    pass the guard for them, nothing else those URLs could resolve to."""
    hosts = []
    for model, urls in settings.vllm.replicas.items():
        if settings.engine.backend_of(model) != "vllm":
            continue
        for url in urls:
            host = urlsplit(url).hostname
            if not host:
                raise ValueError(f"vllm.replicas[{model!r}]: {url!r} has no host (want http://host:port)")
            hosts.append(host.lower().rstrip("."))
    return hosts


def install_from_settings(settings: Settings) -> EgressGuard | None:
    """Install the guard when privacy.block_egress is on (the default); None when it is off."""
    privacy = settings.privacy
    if not privacy.block_egress:
        log.warning("egress.guard_disabled")
        return None
    allow = list(privacy.egress_allow) + vllm_hosts(settings)
    bind = settings.server.host.strip().lower().rstrip(".")
    if bind not in BIND_ONLY and bind not in LOCAL_NAMES and _ip(bind) is None:
        allow.append(bind)  # uvicorn resolves a bind address given by name; it is this host
    guard = EgressGuard(allow).install()
    log.info("egress.guard_installed", allow=sorted(allow))
    return guard
