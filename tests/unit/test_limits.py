"""Rate and concurrency limits, driven by a fake clock (no sleeps)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.auth.limits import ConcurrencyLimiter, RateLimiter
from gateway.core.errors import RateLimited


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_up_to_the_minute_then_429_with_retry_after() -> None:
    clock = FakeClock()
    limiter = RateLimiter(60, clock=clock)
    for _ in range(60):
        limiter.check("alice")
    with pytest.raises(RateLimited) as info:
        limiter.check("alice")
    assert info.value.status_code == 429
    assert info.value.headers["Retry-After"] == "1"  # 60/min refills one token a second


def test_tokens_refill_with_time() -> None:
    clock = FakeClock()
    limiter = RateLimiter(6, clock=clock)  # one token per 10 s
    for _ in range(6):
        limiter.check("alice")
    clock.now += 5
    with pytest.raises(RateLimited) as info:
        limiter.check("alice")
    assert info.value.headers["Retry-After"] == "5"
    clock.now += 5
    limiter.check("alice")
    with pytest.raises(RateLimited):
        limiter.check("alice")


def test_subjects_are_independent() -> None:
    limiter = RateLimiter(2, clock=FakeClock())
    limiter.check("alice")
    limiter.check("alice")
    with pytest.raises(RateLimited):
        limiter.check("alice")
    limiter.check("bob")


def test_refused_requests_do_not_spend_tokens() -> None:
    clock = FakeClock()
    limiter = RateLimiter(60, clock=clock)
    for _ in range(60):
        limiter.check("alice")
    for _ in range(100):
        with pytest.raises(RateLimited):
            limiter.check("alice")
    clock.now += 1
    limiter.check("alice")  # hammering while limited does not push the window out


def test_idle_subjects_are_evicted() -> None:
    clock = FakeClock()
    limiter = RateLimiter(60, clock=clock)
    for n in range(1000):
        limiter.check(f"user-{n}")
    assert len(limiter) == 1000
    clock.now += 61  # every bucket has refilled: forgetting them changes nothing
    limiter.check("fresh")
    assert len(limiter) == 1


def test_memory_is_capped() -> None:
    limiter = RateLimiter(60, clock=FakeClock(), max_subjects=100)
    for n in range(10_000):
        limiter.check(f"user-{n}")
    assert len(limiter) <= 100


def test_zero_disables_the_rate_limit() -> None:
    limiter = RateLimiter(0, clock=FakeClock())
    for _ in range(1000):
        limiter.check("alice")


def test_rate_limiter_is_thread_safe() -> None:
    limiter = RateLimiter(1000, clock=FakeClock())
    allowed = []

    def hammer() -> None:
        for _ in range(500):
            try:
                limiter.check("shared")
                allowed.append(1)
            except RateLimited:
                pass

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(allowed) == 1000  # exactly the bucket, no lost or double-spent tokens


def test_concurrency_limit_per_tenant() -> None:
    limiter = ConcurrencyLimiter(2)
    first, second = limiter.acquire("acme"), limiter.acquire("acme")
    with pytest.raises(RateLimited) as info:
        limiter.acquire("acme")
    assert info.value.code == "concurrency_limit_exceeded"
    assert info.value.headers["Retry-After"] == "1"
    limiter.acquire("other").release()  # another tenant is unaffected
    first.release()
    first.release()  # idempotent: must not free a slot someone else holds
    assert limiter.in_flight("acme") == 1
    third = limiter.acquire("acme")
    with pytest.raises(RateLimited):
        limiter.acquire("acme")
    second.release()
    third.release()
    assert limiter.in_flight("acme") == 0
    assert limiter._in_flight == {}  # no memory kept for idle tenants


def test_slot_releases_on_exceptions_sync_and_async() -> None:
    limiter = ConcurrencyLimiter(1)
    with pytest.raises(ValueError), limiter.acquire("acme"):
        raise ValueError("handler failed")
    assert limiter.in_flight("acme") == 0

    async def handler() -> None:
        async with limiter.acquire("acme"):
            assert limiter.in_flight("acme") == 1
            with pytest.raises(RateLimited):
                limiter.acquire("acme")
            raise asyncio.CancelledError  # a client disconnect

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(handler())
    assert limiter.in_flight("acme") == 0


def test_concurrency_limiter_is_thread_safe() -> None:
    limiter = ConcurrencyLimiter(5)
    peak = []
    barrier = threading.Barrier(20)

    def worker() -> None:
        barrier.wait()
        for _ in range(200):
            try:
                with limiter.acquire("acme"):
                    peak.append(limiter.in_flight("acme"))
            except RateLimited:
                pass

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(peak) <= 5
    assert limiter.in_flight("acme") == 0
