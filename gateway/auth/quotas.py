"""Per-tenant quotas (settings `quotas.*`): the one place each limit is decided and worded.

    quotas = Quotas(settings.quotas)
    quotas.check_storage(tenant, used=(files, bytes), incoming=upload.size)   # 403 quota_exceeded
    quotas.check_job_storage(tenant, used_bytes)                                # 403 quota_exceeded
    quotas.check_waiting_jobs(tenant, waiting)                                  # 429 quota_exceeded
    quotas.tokens.check(tenant); ...; quotas.tokens.charge(tenant, used)        # 429 rate_limit_exceeded

Storage and file count are stock (a tenant frees them by deleting files or fine-tuned models), so going past
them is a 403 that says which limit and how much is in use.  Stored bytes are the tenant's files (uploads and
job results) plus its jobs' adapters on disk (every checkpoint export and final adapter, store.usage): an
upload that would pass the quota is refused, and so is a new job while the tenant is at or past it (a running
job's checkpoints are not cut short, so one job may overshoot by its own outputs).  Waiting jobs and tokens
per minute clear by themselves, so they are 429 with Retry-After.  The running-jobs quota is applied where
jobs are claimed (store.jobs.claim), so a tenant's extra jobs wait in the queue instead of being refused.

TokenBudget is a token bucket per tenant holding up to `tokens_per_minute`, refilled continuously.  A
request is let in while the bucket holds at least one token and is charged its real usage (prompt +
completion) when it ends, so the bucket may go into debt by one request's worth; the next ones wait until it
is paid back.  Idle tenants whose bucket refilled are evicted (memory bounded by those active in a minute).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from gateway.core.errors import QuotaExceeded, RateLimited
from gateway.core.settings import QuotaSettings

__all__ = ["Quotas", "TokenBudget"]

Clock = Callable[[], float]


class TokenBudget:
    """Tokens per minute per tenant: `check` before the work, `charge` with what it really used."""

    def __init__(self, tokens_per_minute: int, *, clock: Clock = time.monotonic, max_tenants: int = 100_000):
        self.limit = tokens_per_minute
        self._per_second = tokens_per_minute / 60.0
        self._clock = clock
        self._max_tenants = max_tenants
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tenant -> (tokens, when)

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def _level(self, tenant: str, now: float) -> float:
        """The tenant's bucket now (removed from the dict; the caller puts it back); lock held."""
        tokens, last = self._buckets.pop(tenant, (float(self.limit), now))
        return min(float(self.limit), tokens + (now - last) * self._per_second)

    def check(self, tenant: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            now = self._clock()
            self._evict_idle(now)
            tokens = self._level(tenant, now)
            self._buckets[tenant] = (tokens, now)
        if tokens < 1.0:
            retry_after = math.ceil((1.0 - tokens) / self._per_second)
            raise RateLimited(
                f"This organization's quota of {self.limit} tokens per minute (prompt + completion, "
                f"quotas.tokens_per_minute) is used up; retry in {retry_after} s.",
                retry_after=retry_after,
            )

    def charge(self, tenant: str, tokens: int) -> None:
        if not self.enabled or tokens <= 0:
            return
        with self._lock:
            now = self._clock()
            self._buckets[tenant] = (self._level(tenant, now) - tokens, now)

    def remaining(self, tenant: str) -> float:
        with self._lock:
            now = self._clock()
            tokens = self._level(tenant, now)
            self._buckets[tenant] = (tokens, now)
            return tokens

    def _evict_idle(self, now: float) -> None:
        while self._buckets:
            tenant, (tokens, last) = next(iter(self._buckets.items()))
            full = tokens + (now - last) * self._per_second >= self.limit
            if not full and len(self._buckets) < self._max_tenants:
                break
            del self._buckets[tenant]


class Quotas:
    def __init__(self, settings: QuotaSettings, *, clock: Clock = time.monotonic) -> None:
        self.settings = settings
        self.tokens = TokenBudget(settings.tokens_per_minute, clock=clock)

    def check_storage(self, tenant: str, *, used_files: int, used_bytes: int, incoming_bytes: int) -> None:
        """Refuse one more file of `incoming_bytes` when it would pass the file count or stored bytes."""
        limit_files, limit_bytes = self.settings.files, self.settings.stored_bytes
        if limit_files > 0 and used_files + 1 > limit_files:
            raise QuotaExceeded(
                f"This organization already stores {used_files} files, its quota of {limit_files} files "
                "(quotas.files); delete files to upload more.",
                param="file",
            )
        if limit_bytes > 0 and used_bytes + incoming_bytes > limit_bytes:
            raise QuotaExceeded(
                f"This upload of {incoming_bytes} bytes would take this organization's stored files and "
                f"fine-tuned models to {used_bytes + incoming_bytes} bytes, past its quota of {limit_bytes} "
                f"bytes (quotas.stored_bytes; {used_bytes} in use); delete files or fine-tuned models to "
                "make room.",
                param="file",
            )

    def check_job_storage(self, tenant: str, used_bytes: int) -> None:
        """Refuse a new fine-tuning job (its adapters will add to the stored bytes) once the tenant's stored
        files and fine-tuned models reach `quotas.stored_bytes`."""
        limit = self.settings.stored_bytes
        if limit > 0 and used_bytes >= limit:
            raise QuotaExceeded(
                f"This organization's stored files and fine-tuned models take {used_bytes} bytes, its quota "
                f"of {limit} bytes (quotas.stored_bytes); delete files or fine-tuned models before creating "
                "a fine-tuning job."
            )

    def check_waiting_jobs(self, tenant: str, waiting: int) -> None:
        """Refuse one more job when the tenant already has `quotas.queued_jobs` waiting."""
        limit = self.settings.queued_jobs
        if limit > 0 and waiting >= limit:
            raise RateLimited(
                f"This organization already has {waiting} fine-tuning jobs waiting, its quota of {limit} "
                "(quotas.queued_jobs); retry when one has started, or cancel one.",
                retry_after=30,
                code="quota_exceeded",
            )
