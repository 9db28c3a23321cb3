"""`make stress`, CI-sized: fuzz, overload, crashes and a full disk against the real server (tests/stress/).

Each test prints its figures (`pytest -s` shows them); `STRESS=full` runs the full sizes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Gateway, running
from tests.stress import SIZES
from tests.stress.fuzz import fuzz

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(3600)]

TENANT_SCOPES = "models:read chat files:read files:write fine_tuning:read fine_tuning:write"
MAX_RUNNING, MAX_QUEUED = 2, 2  # a small engine, so twice its capacity is a handful of streams


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, certs: Path, model_dir: Path) -> Iterator[Gateway]:
    """No fine-tuning worker (jobs the fuzzer creates stay queued); a small engine; short answers."""
    data = tmp_path_factory.mktemp("stress") / "data"
    small = Gateway(
        data_dir=data,
        certs=certs,
        model_dir=model_dir,
        extra_env={
            "GATEWAY_MODELS__MAX_MODEL_LEN": "512",
            "GATEWAY_ENGINE__MAX_RUNNING": str(MAX_RUNNING),
            "GATEWAY_ENGINE__MAX_QUEUED": str(MAX_QUEUED),
            "GATEWAY_ENGINE__DEFAULT_MAX_TOKENS": "8",
            "GATEWAY_LIMITS__MAX_TOKENS_CAP": "64",
            "GATEWAY_LIMITS__MAX_N": "2",
            "GATEWAY_LIMITS__REQUESTS_PER_MINUTE": "1000000",
        },
    )
    yield from running(small, "--no-worker")


def test_fuzz_from_the_spec(gateway: Gateway) -> None:
    report = fuzz(gateway, gateway.token(TENANT_SCOPES), SIZES.fuzz_requests)
    print(
        f"\nfuzz: {report.requests} requests in {report.seconds:.0f} s, statuses {dict(report.statuses)}, "
        f"{report.server_errors} 5xx, {report.failure_count} failures; per route {dict(report.per_operation)}"
    )
    assert report.requests >= SIZES.fuzz_requests
    assert report.failure_count == 0, "\n".join(report.failures)
    assert report.server_errors == 0
