"""Unauthenticated floods: a rate per client address for refused requests that carry no identity.

Every request costs an fsync'd audit record, so a flood of bad tokens (or a scanner's 404s) from one address
would cost one fsync each.  AuditMiddleware asks `refuse(client)` for every response that is an error
(>= 400) with no principal, before its record is written: within the address's budget
(limits.unauthenticated_per_minute, a token bucket) the request is recorded as usual; past it the answer
becomes a 429 with Retry-After and is not recorded one by one.  Instead each address's suppressed requests
are counted in a window, and `due()` hands back one summary record per address and window
(`auth.unauthenticated_flood`, with the count and when the window began), which the app's housekeeping
appends: the fsyncs a flood costs are bounded by the budget plus one per address a minute.

Requests that authenticate are never touched, so a legitimate client behind the same address (a NAT, a
proxy) keeps working while a flood from that address is being refused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from gateway.audit.records import now_rfc3339
from gateway.auth.limits import RateLimiter
from gateway.core.errors import RateLimited

__all__ = ["FLOOD_ACTION", "UnauthenticatedFlood"]

FLOOD_ACTION = "auth.unauthenticated_flood"
WINDOW_SECONDS = 60.0


class UnauthenticatedFlood:
    def __init__(
        self,
        per_minute: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        window_seconds: float = WINDOW_SECONDS,
        max_addresses: int = 100_000,
    ) -> None:
        self.per_minute = per_minute
        self._bucket = RateLimiter(per_minute, clock=clock, max_subjects=max_addresses)
        self._clock = clock
        self._window = window_seconds
        self._max_addresses = max_addresses
        self._lock = threading.Lock()
        # address -> [suppressed count, window start (clock), window start (RFC 3339)]
        self._windows: dict[str, list[Any]] = {}

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def refuse(self, client: str) -> RateLimited | None:
        """Spend one of `client`'s unauthenticated requests; the 429 to answer instead once it has none."""
        if not self.enabled:
            return None
        try:
            self._bucket.check(client)
        except RateLimited as exc:
            with self._lock:
                window = self._windows.get(client)
                if window is None:
                    if len(self._windows) >= self._max_addresses:
                        return exc  # counted in no window: bounded memory wins over a complete count
                    window = self._windows[client] = [0, self._clock(), now_rfc3339()]
                window[0] += 1
            return RateLimited(
                f"Too many unauthenticated requests from this address (limit "
                f"{self.per_minute} per minute, limits.unauthenticated_per_minute); send a valid token.",
                retry_after=int(exc.headers["Retry-After"]),
            )
        return None

    def due(self, *, flush_all: bool = False) -> list[dict[str, Any]]:
        """Summary records of the windows that are over (all of them with `flush_all`, at shutdown)."""
        now = self._clock()
        with self._lock:
            over = [
                (client, window)
                for client, window in self._windows.items()
                if flush_all or now - window[1] >= self._window
            ]
            for client, _ in over:
                del self._windows[client]
        return [
            {
                "action": FLOOD_ACTION,
                "client": client,
                "count": count,
                "since": since,
                "status": 429,
                "outcome": "denied",
            }
            for client, (count, _, since) in over
        ]
