"""Validate bodies against the OpenAI schemas in the vendored spec/ (a check that cannot run fails)."""

from __future__ import annotations

import functools
from typing import Any

from tests.e2e.harness import SPEC


@functools.cache
def _registry() -> Any:
    import yaml
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    document = _nullable_to_json_schema(yaml.load(SPEC.read_text(), Loader=loader))
    return Registry().with_resource("urn:openai-spec", Resource(document, specification=DRAFT202012))


def _nullable_to_json_schema(node: Any) -> Any:
    """The spec mixes OpenAPI 3.0 into 3.1 schemas: `nullable: true` (JSON Schema ignores it; rewritten as an
    explicit null alternative) and boolean `exclusiveMinimum` (rewritten as the 3.1 number form)."""
    if isinstance(node, list):
        return [_nullable_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable_to_json_schema(value) for key, value in node.items()}
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        flag = node.get(bound)
        if not isinstance(flag, bool):  # already the 3.1 number form, or absent
            continue
        del node[bound]  # OpenAPI 3.0 style: a flag on minimum/maximum
        if flag and limit in node:
            node[bound] = node.pop(limit)
    if node.pop("nullable", False) is True:
        if isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
        else:
            node = {"anyOf": [node, {"type": "null"}]}
    return node


def validate(schema_name: str, instance: Any) -> None:
    """Raise jsonschema.ValidationError if `instance` does not match components/schemas/<schema_name>."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(
        {"$ref": f"urn:openai-spec#/components/schemas/{schema_name}"}, registry=_registry()
    )
    validator.validate(instance)
