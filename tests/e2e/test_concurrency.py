"""Many streaming clients at once; a client that walks away mid-stream disturbs nobody."""

from __future__ import annotations

import json
import threading

from tests.e2e.harness import Gateway

MODEL = "smollm2-135m-instruct"


def _stream(
    gateway: Gateway, token: str, prompt: str, max_tokens: int, stop_after: int | None = None
) -> tuple[str, str | None]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    text, finish = "", None
    with gateway.client(token) as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for count, line in enumerate(response.iter_lines()):
            if stop_after is not None and count >= stop_after:
                return text, "disconnected"
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["delta"].get("content", "")
            finish = choice["finish_reason"] or finish
    return text, finish


def test_eight_streams_and_a_disconnect(gateway: Gateway) -> None:
    token = gateway.token()
    prompts = [f"Write two sentences about the number {i}." for i in range(8)]
    expected = {p: _stream(gateway, token, p, 32)[0] for p in prompts[:2]}  # alone, for comparison
    results: dict[int, tuple[str, str | None]] = {}

    def run(i: int) -> None:
        results[i] = _stream(gateway, token, prompts[i], 32)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    quitter = threading.Thread(
        target=lambda: results.__setitem__(
            99, _stream(gateway, token, "Tell a long story.", 400, stop_after=3)
        )
    )
    for thread in [*threads, quitter]:
        thread.start()
    for thread in [*threads, quitter]:
        thread.join(timeout=300)
    assert results[99][1] == "disconnected"
    for i in range(8):
        text, finish = results[i]
        assert text and finish in ("stop", "length")
    for i, prompt in enumerate(prompts[:2]):  # greedy answers do not depend on what else shares the batch
        assert results[i][0] == expected[prompt]
    stats = gateway.client(gateway.token("admin")).get("/readyz").json()
    assert stats["status"] == "ready"
