"""The `make stress` harness: hostile load against the real server over loopback, bounded in count and time.

Run by tests/e2e/test_stress.py.  Sizes: the CI version by default (part of `make test`); `STRESS=full` (what
`make stress` sets) for the full proof.  Each size can be overridden alone, e.g. `STRESS_FUZZ_REQUESTS=300`.

    fuzz.py      schemathesis requests from the vendored spec, for every route we serve
    overload.py  twice the engine's capacity in concurrent streams, some walking away mid-stream
    crashes.py   kill -9 of the fine-tuning worker mid-training, and of the gateway mid-request
    disk.py      a data dir on a size-limited tmpfs that fills up
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["SIZES", "Sizes"]


@dataclass(frozen=True)
class Sizes:
    fuzz_requests: int
    overload_seconds: float
    worker_kills: int
    gateway_kills: int


_PRESETS = {
    "ci": Sizes(fuzz_requests=1_000, overload_seconds=15, worker_kills=3, gateway_kills=3),
    "full": Sizes(fuzz_requests=10_000, overload_seconds=60, worker_kills=20, gateway_kills=20),
}


def _sizes() -> Sizes:
    preset = _PRESETS[os.environ.get("STRESS", "ci")]
    return Sizes(
        fuzz_requests=int(os.environ.get("STRESS_FUZZ_REQUESTS", preset.fuzz_requests)),
        overload_seconds=float(os.environ.get("STRESS_OVERLOAD_SECONDS", preset.overload_seconds)),
        worker_kills=int(os.environ.get("STRESS_WORKER_KILLS", preset.worker_kills)),
        gateway_kills=int(os.environ.get("STRESS_GATEWAY_KILLS", preset.gateway_kills)),
    )


SIZES = _sizes()
