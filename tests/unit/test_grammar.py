"""Constrained decoding in the local engine: per-row grammars on a tiny random model (whose free text is
noise, so only the mask can make it produce valid JSON), sharing one batch with free rows."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import jsonschema
import pytest

from gateway.core.errors import InvalidRequest
from gateway.engine.base import Grammar
from gateway.engine.local.grammar import unsupported_keyword
from tests.unit.tiny_engine import collect, request

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "age": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/Tag"}, "minItems": 1, "maxItems": 2},
    },
    "required": ["name", "color", "age", "tags"],
    "additionalProperties": False,
    "$defs": {"Tag": {"type": "string", "enum": ["a", "b"]}},
}


def _constrained(schema: dict[str, object] | None = None, **sampling: object):  # type: ignore[no-untyped-def]
    grammar = Grammar("json_schema", json.dumps(schema or SCHEMA))
    return dataclasses.replace(request(**sampling), grammar=grammar)  # type: ignore[arg-type]


def test_constrained_and_free_rows_share_a_step(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine = engine_factory()

    async def run():  # type: ignore[no-untyped-def]
        free = request(max_tokens=20, temperature=0, ignore_eos=True)
        alone = await collect(engine, free)
        together = await asyncio.gather(
            collect(engine, _constrained(max_tokens=200, temperature=1.0, seed=1)),
            collect(engine, free),
            collect(engine, _constrained(max_tokens=200, temperature=0)),
        )
        return alone, together

    alone, (first, free, greedy) = asyncio.run(run())
    for texts, finish, _ in (first, greedy):
        assert finish == {0: "stop"}
        jsonschema.validate(json.loads(texts[0]), SCHEMA)
        assert " \n" not in texts[0] and "  " not in texts[0]  # whitespace is capped
    assert free[0] == alone[0]  # the free row is untouched by its constrained neighbours


def test_budget_end_is_length_and_n_rows_keep_their_own_state(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine = engine_factory()
    texts, finish, tokens = asyncio.run(collect(engine, _constrained(max_tokens=4, temperature=0)))
    assert finish == {0: "length"} and tokens == 4 and texts[0].startswith("{")
    texts, finish, _ = asyncio.run(
        collect(engine, _constrained(max_tokens=200, temperature=1.0, seed=3, n=3))
    )
    assert finish == {0: "stop", 1: "stop", 2: "stop"}
    for text in texts.values():
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_and_the_compile_cache(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine = engine_factory()
    req = dataclasses.replace(request(max_tokens=60, temperature=0), grammar=Grammar("json_object"))
    texts, finish, _ = asyncio.run(collect(engine, req))
    if finish[0] == "stop":
        assert isinstance(json.loads(texts[0]), dict)
    else:
        assert texts[0].startswith("{")
    before = engine.grammars.compiled
    asyncio.run(collect(engine, _constrained(max_tokens=3)))
    asyncio.run(collect(engine, _constrained(max_tokens=3)))
    assert engine.grammars.compiled == before + 1


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "bogus"},
        {"$ref": "#/$defs/Missing"},
        {"type": "object", "properties": {"a": {"not": {"type": "string"}}}},
        {"type": "string", "pattern": "(("},
    ],
)
def test_a_schema_the_engine_cannot_enforce_is_a_400(engine_factory, schema) -> None:  # type: ignore[no-untyped-def]
    engine = engine_factory()
    with pytest.raises(InvalidRequest) as caught:
        asyncio.run(collect(engine, _constrained(schema, max_tokens=3)))
    assert caught.value.param == "response_format" and caught.value.status_code == 400


def test_unsupported_keyword_looks_at_keywords_not_property_names() -> None:
    assert unsupported_keyword({"type": "object", "properties": {"not": {"type": "string"}}}) is None
    assert unsupported_keyword({"enum": ["if", "not"]}) is None
    found = unsupported_keyword({"anyOf": [{"type": "string"}, {"if": {}}]})
    assert found == "#/anyOf/1/if"
