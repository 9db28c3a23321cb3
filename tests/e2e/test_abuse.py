"""One tenant's hostile load does not stall the rest: /healthz keeps answering while 1 MiB bodies of many
tiny messages pour in (each once held the event loop for a second while it was tokenized)."""

from __future__ import annotations

import json
import statistics
import threading
import time

import httpx

from tests.e2e.harness import Gateway
from tests.spec import validate

MODEL = "smollm2-135m-instruct"


def _body(messages: list[dict[str, str]]) -> bytes:
    return json.dumps({"model": MODEL, "messages": messages, "max_tokens": 1}).encode()


def _flood_bodies(limit: int) -> dict[str, bytes]:
    """Three hostile shapes, each just under `limit` bytes or well past the context:
    tiny: as many one-character messages as fit (refused by the decoder: more than 2048 messages);
    wide: 2048 messages of long text (refused by the cheap bound: more characters than the context holds);
    dense: 2000 short messages under that bound (tokenized, off the loop, then refused by the real count)."""
    tiny = {"role": "user", "content": "x"}
    count = (limit - 200) // (len(json.dumps(tiny)) + 2)
    while len(_body([tiny] * count)) > limit:
        count -= 50
    per = (limit - 200) // 2048 - 40
    wide = _body([{"role": "user", "content": "w" * per}] * 2048)
    dense = _body([{"role": "user", "content": "word " * 12}] * 2000)
    return {"tiny": _body([tiny] * count), "wide": wide, "dense": dense}


def test_healthz_answers_within_100ms_while_huge_prompts_pour_in(gateway: Gateway) -> None:
    bodies = _flood_bodies(gateway.settings().server.max_body_bytes)
    assert len(bodies["tiny"]) > 1_000_000 and bodies["tiny"].count(b'"user"') > 30_000
    assert len(bodies["wide"]) > 1_000_000
    stop = threading.Event()
    statuses: list[int] = []
    errors: dict[str, list[dict[str, object]]] = {name: [] for name in bodies}

    def flood(sub: str) -> None:  # several subjects, so the per-subject rate limit is not what saves us
        with gateway.client(gateway.token(sub=sub)) as http:
            while not stop.is_set():
                for name, body in bodies.items():
                    response = http.post(
                        "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
                    )
                    statuses.append(response.status_code)
                    if response.status_code == 400:
                        errors[name].append(response.json())

    threads = [threading.Thread(target=flood, args=(f"flood-{i}",), daemon=True) for i in range(4)]
    for thread in threads:
        thread.start()
    latencies: list[float] = []
    try:
        with httpx.Client(base_url=gateway.url, verify=gateway.verify(), timeout=10) as health:
            health.get("/healthz")  # the TLS connection is made before we time anything
            time.sleep(1.0)  # the flood is under way
            deadline = time.monotonic() + 8.0
            while time.monotonic() < deadline:
                started = time.perf_counter()
                response = health.get("/healthz")
                latencies.append(time.perf_counter() - started)
                assert response.status_code == 200
                time.sleep(0.02)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert len(statuses) >= 20, statuses  # the flood really poured in (4 clients, ~8 s)
    assert set(statuses) <= {400, 429}, set(statuses)  # refused, never a 5xx
    expected = {"tiny": (None, "messages"), "wide": ("context_length_exceeded", "messages")}
    expected["dense"] = expected["wide"]
    for name, seen in errors.items():
        assert seen, f"no {name} request was answered"
        for error in seen:
            validate("ErrorResponse", error)
            assert (error["error"]["code"], error["error"]["param"]) == expected[name], error  # type: ignore[index]
    assert "characters" in errors["wide"][0]["error"]["message"]  # type: ignore[index]
    assert "tokens" in errors["dense"][0]["error"]["message"]  # type: ignore[index]
    latencies.sort()
    p90 = latencies[int(len(latencies) * 0.9)]
    assert statistics.median(latencies) < 0.1 and p90 < 0.1, (
        f"/healthz median {statistics.median(latencies) * 1000:.0f} ms, p90 {p90 * 1000:.0f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms over {len(latencies)} probes"
    )
