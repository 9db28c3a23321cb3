"""Shared test setup.

Section 1, the egress guard: nothing in the test run may reach past this machine.  Any connect (TCP or UDP,
sync or asyncio, via create_connection or a raw socket) or name lookup aimed at an address other than
loopback or a Unix socket raises EgressBlocked, and the test that tried fails at teardown even if the code
under test swallowed the exception.  It is the product's guard (gateway/security/egress.py) with an empty
allow-list; the e2e server subprocess is not covered by this in-process patch, but `gateway serve` installs
the same guard itself (privacy.block_egress is on by default).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.security.egress import EgressBlocked, EgressGuard

__all__ = ["EgressBlocked"]

# ── Section 1: egress guard ─────────────────────────────────────────────────────────────────────────────────
# The product's own guard (gateway/security/egress.py) with an empty allow-list: one implementation for both.

_attempts: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def egress_guard() -> Iterator[EgressGuard]:
    with EgressGuard(on_block=lambda host: _attempts.append(repr(host))) as guard:
        yield guard


@pytest.fixture(autouse=True)
def _fail_on_egress_attempt(egress_guard: EgressGuard) -> Iterator[None]:
    """Fail the test that tried to reach out, even if the code under test caught EgressBlocked."""
    _attempts.clear()
    yield
    if _attempts:
        attempts = ", ".join(_attempts)
        _attempts.clear()
        pytest.fail(f"network egress attempted: {attempts}", pytrace=False)


# ── Section 2: --reverse: any order must pass ─────────────────────────────────────────────────────────────
# CI runs the stateful modules once more in reverse order, so a test that only passes because another one ran
# before it (and left a model, a job or a log line behind) fails there.


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--reverse", action="store_true", help="run the collected tests in reverse order")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--reverse"):
        items.reverse()


# ── Section 3: shared fixtures (the lead adds app/client fixtures here) ─────────────────────────────────────
