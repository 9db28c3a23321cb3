"""Per-subject request rate and per-tenant concurrency, both answering 429 with Retry-After.

RateLimiter is a token bucket per subject: capacity = requests_per_minute (a client may burst its whole
minute), refilled continuously at rpm/60 per second.  A bucket that has refilled completely is the same as no
bucket, so idle subjects are evicted from the front of an LRU-ordered dict (O(1) amortised per request, memory
bounded by the subjects active within the last minute, hard-capped by `max_subjects`).

ConcurrencyLimiter counts requests in flight per tenant and refuses, rather than queues, the one past the
limit: queueing belongs to the engine, which knows its own capacity.  A Slot is released exactly once, also
for streamed responses that end long after the handler returned.

Both use one threading.Lock around a few dict operations and never await while holding it, so they are safe
from the event loop and from worker threads alike.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from types import TracebackType

from gateway.core.errors import RateLimited

__all__ = ["ConcurrencyLimiter", "RateLimiter", "Slot"]

Clock = Callable[[], float]


class RateLimiter:
    """Token bucket per subject; `check(subject)` spends one token or raises RateLimited."""

    def __init__(
        self, requests_per_minute: int, *, clock: Clock = time.monotonic, max_subjects: int = 100_000
    ) -> None:
        self._capacity = float(requests_per_minute)
        self._per_second = requests_per_minute / 60.0
        self._clock = clock
        self._max_subjects = max_subjects
        self._lock = threading.Lock()
        # subject -> (tokens left, time of last update); least recently used first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self._capacity > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, subject: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            now = self._clock()
            self._evict_idle(now)
            tokens, last = self._buckets.pop(subject, (self._capacity, now))
            tokens = min(self._capacity, tokens + (now - last) * self._per_second)
            if tokens >= 1.0:
                self._buckets[subject] = (tokens - 1.0, now)
                return
            self._buckets[subject] = (tokens, now)
        retry_after = math.ceil((1.0 - tokens) / self._per_second)
        raise RateLimited(
            f"rate limit of {int(self._capacity)} requests per minute exceeded", retry_after=retry_after
        )

    def _evict_idle(self, now: float) -> None:
        full_after = self._capacity / self._per_second  # seconds for an empty bucket to refill
        while self._buckets:
            subject, (_, last) = next(iter(self._buckets.items()))
            if now - last < full_after and len(self._buckets) < self._max_subjects:
                break
            # Refilled (same as new) or over the cap (losing the oldest state is the lesser harm).
            del self._buckets[subject]


class Slot:
    """One request in flight for a tenant; release() is idempotent. Usable with `with` and `async with`."""

    __slots__ = ("_limiter", "_released", "tenant")

    def __init__(self, limiter: ConcurrencyLimiter, tenant: str) -> None:
        self._limiter = limiter
        self.tenant = tenant
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._limiter._release(self.tenant)

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aenter__(self) -> Slot:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class ConcurrencyLimiter:
    """At most `limit` requests in flight per tenant; `acquire(tenant)` -> Slot, or raises RateLimited."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}  # only tenants with something in flight, so memory is bounded

    def in_flight(self, tenant: str) -> int:
        return self._in_flight.get(tenant, 0)

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, limit: int) -> None:
        """Change the limit (limits.tenant_concurrency = auto, once an engine is sized); requests already in
        flight keep their slots."""
        with self._lock:
            self._limit = limit

    def acquire(self, tenant: str) -> Slot:
        with self._lock:
            current = self._in_flight.get(tenant, 0)
            if self._limit > 0 and current >= self._limit:
                raise RateLimited(
                    f"too many concurrent requests for this organization (limit {self._limit})",
                    retry_after=1,
                    code="concurrency_limit_exceeded",
                )
            self._in_flight[tenant] = current + 1
        return Slot(self, tenant)

    def _release(self, tenant: str) -> None:
        with self._lock:
            left = self._in_flight.get(tenant, 0) - 1
            if left > 0:
                self._in_flight[tenant] = left
            else:
                self._in_flight.pop(tenant, None)
