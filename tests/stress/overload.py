"""Twice the engine's capacity (max_running + max_queued) in concurrent streams, for a fixed time.

Each client opens a stream, reads it to the end or walks away after a chunk or two (about a third of them),
and opens the next at once; a 429 is retried after a short pause, ignoring `Retry-After` as a hostile client
would.  Every answer must be a 200 (whose chunks match the spec) or a 429 with `Retry-After`; afterwards the
engine's running and queued counts return to 0, and the time that took is measured.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from tests.e2e.harness import Gateway
from tests.spec import validate

__all__ = ["OverloadReport", "overload", "wait_idle"]

MODEL = "smollm2-135m-instruct"


@dataclass
class OverloadReport:
    streams: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    walked_away: int = 0
    codes: Counter[str] = field(default_factory=Counter)  # the error codes of the refusals
    completed: int = 0
    failures: list[str] = field(default_factory=list)
    idle_after_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(
        self, status: int, *, walked: bool = False, failure: str | None = None, code: str | None = None
    ) -> None:
        with self.lock:
            if code:
                self.codes[code] += 1
            self.streams += 1
            self.statuses[status] += 1
            self.walked_away += walked
            self.completed += status == 200 and not walked
            if failure and len(self.failures) < 20:
                self.failures.append(failure)


def _one(http: httpx.Client, rng: random.Random, report: OverloadReport) -> None:
    walk_after = rng.randint(1, 2) if rng.random() < 0.35 else None
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell a long story about the sea."}],
        "max_tokens": rng.randint(16, 48),
        "ignore_eos": True,  # hold the slot for the whole max_tokens
        "stream": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            failure = None
            if response.status_code != 429:
                failure = f"{response.status_code} {response.text[:300]}"
            elif "retry-after" not in response.headers:
                failure = "429 without Retry-After"
            try:
                code = str(response.json()["error"]["code"])
            except (ValueError, KeyError, TypeError):
                code, failure = None, failure or f"{response.status_code} not an error envelope"
            report.add(response.status_code, failure=failure, code=code)
            if response.status_code == 429:
                time.sleep(0.05)
            return
        chunks = 0
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                report.add(500, failure=f"an error after the 200: {line[:300]}")
                return
            validate("CreateChatCompletionStreamResponse", chunk)
            chunks += 1
            if walk_after is not None and chunks >= walk_after:
                report.add(200, walked=True)  # leaving the `with` closes the connection mid-stream
                return
    report.add(200)


def wait_idle(gateway: Gateway, timeout: float = 30) -> float:
    """Seconds until the engine runs and queues nothing (raises past `timeout`)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if (
            gateway.metric("gateway_engine_running_sequences") == 0
            and gateway.metric("gateway_engine_queued_sequences") == 0
        ):
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"the engine still runs sequences {timeout}s after the last client")


def overload(gateway: Gateway, token: str, clients: int, seconds: float, seed: int = 13) -> OverloadReport:
    report = OverloadReport()
    stop_at = time.monotonic() + seconds

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        with gateway.client(token) as http:
            while time.monotonic() < stop_at:
                try:
                    _one(http, rng, report)
                except httpx.HTTPError as exc:
                    report.add(0, failure=f"transport error: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 300)
    report.idle_after_seconds = wait_idle(gateway)
    return report


@dataclass(frozen=True)
class WalkAway:
    """One client that left a long stream after a few chunks."""

    step: float  # seconds per decode step, measured on that stream
    looked: float  # seconds after leaving that the one look at the engine was taken
    free_at_look: bool  # whether that look saw no running or queued sequence
    freed: float  # seconds after leaving a look first saw it free (`looked`, or later polls)

    @property
    def steps(self) -> float:
        return self.looked / self.step


def _engine_counts(scrape: httpx.Client) -> tuple[float, float]:
    """(running, queued) from one /metrics scrape."""
    found: dict[str, float] = {}
    for line in scrape.get("/metrics").text.splitlines():
        for name in ("gateway_engine_running_sequences", "gateway_engine_queued_sequences"):
            if line.startswith(name) and line[len(name)] in " {":
                found.setdefault(name, float(line.rsplit(" ", 1)[1]))
    return found["gateway_engine_running_sequences"], found["gateway_engine_queued_sequences"]


def release_after_walking_away(
    gateway: Gateway, token: str, *, trials: int = 3, look_after_steps: float = 1.5
) -> list[WalkAway]:
    """Long streams each left after five chunks, one at a time; `look_after_steps` decode steps after leaving,
    one look (a /metrics scrape over a connection opened beforehand) says whether the slot is free.

    Nothing touches the server between leaving and the look, on purpose: a scrape costs the server ~10 ms of
    GIL, which stretches the decode step in flight, so watching by polling delays the very release it
    measures (polling back to back made a ~60 ms step last 124-266 ms: 2-4.6 "steps").  The server drops the
    row when the step in flight ends (its abort arrives within a few ms of the client leaving), so one step
    plus slack for a loaded machine is when the look must find it free."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": 64,  # the stress gateway caps max_tokens at 64
        "ignore_eos": True,
        "stream": True,
    }
    results = []
    with gateway.client() as scrape, gateway.client(token) as http:
        _engine_counts(scrape)  # the scrape connection is open before the clock starts
        for _ in range(trials):
            arrivals: list[float] = []
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200, response.read().decode(errors="replace")
                for line in response.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        arrivals.append(time.monotonic())
                        if len(arrivals) >= 5:
                            break
            left = time.monotonic()  # the response closed: httpx drops the connection mid-stream
            step = (arrivals[-1] - arrivals[1]) / (len(arrivals) - 2)  # the first chunk carries only the role
            time.sleep(max(0.0, left + look_after_steps * step - time.monotonic()))
            looked = time.monotonic() - left
            free = _engine_counts(scrape) == (0, 0)
            freed = looked
            while not free:
                time.sleep(0.02)
                free = _engine_counts(scrape) == (0, 0)
                freed = time.monotonic() - left
                assert freed < 30, "the engine still runs the stream 30 s after its client left"
            results.append(WalkAway(step=step, looked=looked, free_at_look=freed == looked, freed=freed))
            time.sleep(0.2)
    return results
