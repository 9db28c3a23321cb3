"""Request bodies that used to be 500s: nesting past the cap, a seed past int64, and the cheap depth check."""

from __future__ import annotations

import json
import time

import msgspec
import pytest

from gateway.api.chat.protocol import ChatCompletionRequest
from gateway.api.codec import MAX_JSON_DEPTH, decode_body, json_depth_exceeds
from gateway.core.errors import InvalidRequest


def _nested_arrays(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _nested_objects(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.mark.parametrize("make", [_nested_arrays, _nested_objects])
def test_depth_is_counted_exactly_at_the_limit(make: object) -> None:
    assert callable(make)
    assert not json_depth_exceeds(make(MAX_JSON_DEPTH), MAX_JSON_DEPTH)
    assert json_depth_exceeds(make(MAX_JSON_DEPTH + 1), MAX_JSON_DEPTH)


def test_brackets_inside_strings_do_not_count() -> None:
    text = json.dumps({"x": "[" * 500 + '\\"\\\\"' + "{" * 300, "y": ['a"b', "c\\"] * 100}).encode()
    assert not json_depth_exceeds(text, 4)
    wide = json.dumps({"x": [[[[]]]] * 300}).encode()  # many brackets, little depth
    assert not json_depth_exceeds(wide, 5) and json_depth_exceeds(wide, 4)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 5_000, 500_000])
def test_deep_nesting_is_a_400_not_a_recursion_error(depth: int) -> None:
    body = (
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "x": '
        + _nested_arrays(depth)
        + b"}"
    )
    if depth >= 5_000:
        with pytest.raises(RecursionError):  # what the decoder alone does: a 500 without the cap
            msgspec.json.decode(_nested_arrays(depth))
    with pytest.raises(InvalidRequest, match="nested more than") as refused:
        decode_body(body, ChatCompletionRequest)
    assert refused.value.status_code == 400


def test_a_wide_body_still_decodes() -> None:
    messages = [{"role": "user", "content": "[{"}] * 200
    body = json.dumps(
        {
            "model": "m",
            "messages": messages,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"a": [[1]]}}}] * 100,
        }
    ).encode()
    assert len(decode_body(body, ChatCompletionRequest).messages) == 200


def test_the_depth_check_is_cheap_on_a_mebibyte() -> None:
    bodies = [
        _nested_arrays(500_000),
        json.dumps({"messages": [{"role": "user", "content": 'a"b'}] * 36_000}).encode(),
    ]
    for body in bodies:
        started = time.process_time()
        json_depth_exceeds(body, MAX_JSON_DEPTH)
        assert time.process_time() - started < 0.25  # ~10 ms measured; a Python loop would take ~0.5 s


@pytest.mark.parametrize("seed", [2**63, 2**64, 2**70, -(2**63) - 1])
def test_a_seed_past_int64_is_a_400_naming_seed(seed: int) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": seed}).encode()
    with pytest.raises(InvalidRequest) as refused:
        decode_body(body, ChatCompletionRequest)
    assert refused.value.param == "seed"


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63), 0])
def test_int64_seeds_are_accepted(seed: int) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": seed}).encode()
    assert decode_body(body, ChatCompletionRequest).seed == seed
