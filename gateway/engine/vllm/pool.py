"""The replicas that serve one base model: which are healthy, how loaded each is, which adapters each holds.

A request goes to the healthy replica with the fewest requests in flight through this gateway (ties: the
first listed).  A replica that fails a connect, a stream or a health probe is taken out; the engine's health
thread re-probes it and puts it back once /health answers 200 again.  A replica that comes back has lost its
runtime-loaded adapters (it restarted), so its adapter set is cleared and they are loaded again on next use.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

__all__ = ["Replica", "ReplicaPool"]


@dataclass(eq=False)
class Replica:
    url: str  # http://host:port, no trailing slash
    healthy: bool = False
    in_flight: int = 0
    adapters: set[str] = field(default_factory=set)
    failures: int = 0  # in a row; resets when it is healthy again


class ReplicaPool:
    def __init__(self, urls: list[str]) -> None:
        if not urls:
            raise ValueError("a vLLM model needs at least one replica URL")
        self.replicas = [Replica(url.rstrip("/")) for url in urls]
        self._lock = threading.Lock()

    def healthy(self) -> list[Replica]:
        with self._lock:
            return [r for r in self.replicas if r.healthy]

    def any_healthy(self) -> bool:
        return any(r.healthy for r in self.replicas)

    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas)

    def pick(self, adapter: str | None = None, exclude: frozenset[str] = frozenset()) -> Replica | None:
        """The least-loaded healthy replica (holding `adapter` when one is named), or None."""
        with self._lock:
            candidates = [
                r
                for r in self.replicas
                if r.healthy and r.url not in exclude and (adapter is None or adapter in r.adapters)
            ]
            return min(candidates, key=lambda r: r.in_flight) if candidates else None

    def acquire(self, replica: Replica) -> None:
        with self._lock:
            replica.in_flight += 1

    def release(self, replica: Replica) -> None:
        with self._lock:
            replica.in_flight -= 1

    def mark_down(self, replica: Replica) -> bool:
        """Take a replica out; True if it was in (the caller logs the change once)."""
        with self._lock:
            was = replica.healthy
            replica.healthy = False
            replica.failures += 1
            replica.adapters.clear()  # it may restart: what it held is unknown until loaded again
            return was

    def mark_up(self, replica: Replica) -> bool:
        """Put a replica (back) in; True if it was out."""
        with self._lock:
            was = replica.healthy
            replica.healthy = True
            replica.failures = 0
            return not was

    def holding(self, adapter: str) -> list[Replica]:
        with self._lock:
            return [r for r in self.replicas if adapter in r.adapters]

    def all_hold(self, adapter: str) -> bool:
        """Every healthy replica holds `adapter` (and at least one is healthy)."""
        with self._lock:
            live = [r for r in self.replicas if r.healthy]
            return bool(live) and all(adapter in r.adapters for r in live)
