"""A table of malformed requests: each gets its documented status and the OpenAI error envelope, and the
server keeps serving."""

from __future__ import annotations

import pytest

from tests.e2e.harness import Gateway
from tests.spec import validate

MODEL = "smollm2-135m-instruct"
OK_MESSAGES = [{"role": "user", "content": "Hi"}]
# a valid request but for an unknown field nested deep (which the decoder skips, recursing as it goes)
_NESTED = b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "x": '

CASES = [
    ("malformed json", b'{"model": "x", "messages": [', 400, None),
    ("not an object", b"[1, 2, 3]", 400, None),
    ("empty body", b"", 400, None),
    ("missing messages", {"model": MODEL}, 400, "messages"),
    ("empty messages", {"model": MODEL, "messages": []}, 400, "messages"),
    (
        "wrong role",
        {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages[0].role",
    ),
    (
        "content wrong type",
        {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
        400,
        "messages[0].content",
    ),
    ("max_tokens negative", {"model": MODEL, "messages": OK_MESSAGES, "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens string", {"model": MODEL, "messages": OK_MESSAGES, "max_tokens": "ten"}, 400, "max_tokens"),
    ("temperature too high", {"model": MODEL, "messages": OK_MESSAGES, "temperature": 3}, 400, "temperature"),
    ("top_p zero", {"model": MODEL, "messages": OK_MESSAGES, "top_p": 0}, 400, "top_p"),
    ("n zero", {"model": MODEL, "messages": OK_MESSAGES, "n": 0}, 400, "n"),
    (
        "too many stops",
        {"model": MODEL, "messages": OK_MESSAGES, "stop": ["a", "b", "c", "d", "e"]},
        400,
        "stop",
    ),
    (
        "image part",
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}
            ],
        },
        400,
        "messages[0].content[0]",
    ),
    ("unknown model", {"model": "gpt-17", "messages": OK_MESSAGES}, 404, "model"),
    (
        "over the context",
        {"model": MODEL, "messages": [{"role": "user", "content": "word " * 2100}]},
        400,
        "messages",
    ),
    (
        "max_tokens over cap",
        {"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 1_000_000},
        400,
        "max_tokens",
    ),
    ("huge body", b'{"model": "' + b"x" * 2_000_000 + b'"}', 413, None),
    # once 500s: the decoder's RecursionError, a seed torch cannot take, seed + index past 2^64
    ("deeply nested", _NESTED + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, None),
    ("nested past the cap", _NESTED + b"[" * 64 + b"]" * 64 + b"}", 400, None),
    ("seed 2^64", {"model": MODEL, "messages": OK_MESSAGES, "seed": 2**64}, 400, "seed"),
    ("seed past int64", {"model": MODEL, "messages": OK_MESSAGES, "seed": 2**63}, 400, "seed"),
]


@pytest.mark.parametrize(("name", "body", "status", "param"), CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_envelope(
    gateway: Gateway, name: str, body: object, status: int, param: str | None
) -> None:
    with gateway.client(gateway.token()) as http:
        if isinstance(body, bytes):
            response = http.post(
                "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
            )
        else:
            response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == status, response.text
        error = response.json()
        validate("ErrorResponse", error)
        assert set(error["error"]) == {"message", "type", "param", "code"}
        assert error["error"]["message"] and "Traceback" not in response.text
        assert error["error"]["param"] == param
        if status == 404:
            assert error["error"]["code"] == "model_not_found"
        # and the server keeps serving
        ok = http.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 2}
        )
        assert ok.status_code == 200


def test_unknown_route_and_method(gateway: Gateway) -> None:
    with gateway.client(gateway.token()) as http:
        missing = http.get("/v1/does-not-exist")
        assert missing.status_code in (401, 404)
        validate("ErrorResponse", missing.json())
        wrong = http.get("/v1/chat/completions")
        assert wrong.status_code in (404, 405)
        validate("ErrorResponse", wrong.json())


def test_a_top_of_int64_seed_with_n_is_served(gateway: Gateway) -> None:
    body = {"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 2, "seed": 2**63 - 1, "n": 3}
    with gateway.client(gateway.token()) as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    validate("CreateChatCompletionResponse", response.json())
    assert len(response.json()["choices"]) == 3


@pytest.mark.parametrize("after", ["\u0663", "\uff11", "1_000", " 7", "9" * 20])
def test_a_non_ascii_or_odd_integer_in_after_is_a_400(gateway: Gateway, after: str) -> None:
    with gateway.client(gateway.token("admin")) as http:
        response = http.get("/v1/audit", params={"after": after})
    assert response.status_code == 400, response.text
    validate("ErrorResponse", response.json())
    assert response.json()["error"]["param"] == "after"
