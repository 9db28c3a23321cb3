"""What a chat request asks the engine to enforce: `response_format`, `tools` / `tool_choice` and the
deprecated `functions` / `function_call`, turned into one plan.

    response_format text         -> free text
    response_format json_object  -> any JSON object            (Grammar "json_object")
    response_format json_schema  -> that schema, strict or not (always enforced: valid either way)
    tool_choice none             -> tools are not shown to the model, free text
    tool_choice auto (default)   -> tools in the prompt; `<tool_call>` blocks parsed out of free text
    tool_choice required / named -> a JSON list of calls whose arguments match each function's parameters
                                    (one call at most when parallel_tool_calls is false, or named, or legacy)

As vLLM does, a forced tool choice wins over response_format.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Literal

from gateway.api.chat import protocol as p
from gateway.core.errors import InvalidRequest
from gateway.engine.base import Grammar

__all__ = ["Plan", "plan_for"]


@dataclass(frozen=True)
class Plan:
    grammar: Grammar | None = None
    grammar_param: str = "response_format"  # the field a grammar error is reported against
    tools: tuple[dict[str, Any], ...] = ()  # rendered into the prompt
    tool_mode: Literal["none", "auto", "forced"] = "none"
    legacy: bool = False  # functions/function_call: answer with message.function_call


def plan_for(req: p.ChatCompletionRequest) -> Plan:
    grammar = _response_format(req.response_format)
    legacy = bool(req.functions) and not req.tools
    if req.tools and req.functions:
        raise InvalidRequest("send tools or the deprecated functions, not both", param="functions")
    functions = [t.function for t in req.tools or []] if not legacy else list(req.functions or [])
    choice_param = "function_call" if legacy else "tool_choice"
    choice: Any = req.function_call if legacy else req.tool_choice
    if not functions:
        if choice not in (None, "none", "auto"):
            raise InvalidRequest(
                f"{choice_param} needs {'functions' if legacy else 'tools'}", param=choice_param
            )
        return Plan(grammar=grammar)
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise InvalidRequest("function names must be unique", param="functions" if legacy else "tools")
    if choice is None:
        choice = "auto"
    if choice == "none":
        return Plan(grammar=grammar)
    rendered = tuple(_tool_dict(f) for f in functions)
    if choice == "auto":
        return Plan(grammar=grammar, tools=rendered, tool_mode="auto", legacy=legacy)
    if choice == "required":
        allowed, single = functions, (req.parallel_tool_calls is False) or legacy
    else:
        name = choice.function.name if isinstance(choice, p.NamedToolChoice) else choice.name
        allowed = [f for f in functions if f.name == name]
        if not allowed:
            raise InvalidRequest(
                f"{choice_param} names a function that is not defined: {name}", param=choice_param
            )
        single = True
    schema = _calls_schema(allowed, single=single)
    return Plan(
        grammar=Grammar("json_schema", json.dumps(schema)),
        grammar_param="functions" if legacy else "tools",
        tools=rendered,
        tool_mode="forced",
        legacy=legacy,
    )


def _response_format(fmt: p.ResponseFormat | None) -> Grammar | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Grammar("json_object")
    spec = fmt.json_schema
    if spec is p.UNSET:
        raise InvalidRequest(
            "response_format json_schema needs a json_schema object", param="response_format"
        )
    if spec.schema is p.UNSET:
        return Grammar("json_object")
    return Grammar("json_schema", json.dumps(spec.schema))


def _tool_dict(f: p.FunctionDefinition) -> dict[str, Any]:
    function: dict[str, Any] = {"name": f.name}
    if f.description is not p.UNSET:
        function["description"] = f.description
    function["parameters"] = (
        f.parameters if f.parameters is not p.UNSET else {"type": "object", "properties": {}}
    )
    return {"type": "function", "function": function}


def _calls_schema(functions: list[p.FunctionDefinition], *, single: bool) -> dict[str, Any]:
    """A JSON list of `{"name": <const>, "arguments": <parameters>}`; each function's $defs are hoisted to
    the top (renamed per function) so their $refs still resolve."""
    defs: dict[str, Any] = {}
    variants = []
    for i, f in enumerate(functions):
        params = f.parameters if f.parameters is not p.UNSET else {"type": "object", "properties": {}}
        params = _hoist(copy.deepcopy(params), f"f{i}_", defs)
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"const": f.name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    items = variants[0] if len(variants) == 1 else {"anyOf": variants}
    schema: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if single:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def _hoist(schema: Any, prefix: str, defs: dict[str, Any]) -> Any:
    if not isinstance(schema, dict):
        return schema
    local = {**schema.pop("definitions", {}), **schema.pop("$defs", {})}
    for name, sub in local.items():
        defs[prefix + name] = sub

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str):
                    for root in ("#/$defs/", "#/definitions/"):
                        if value.startswith(root):
                            value = "#/$defs/" + prefix + value[len(root) :]
                    out[key] = value
                else:
                    out[key] = rewrite(value)
            return out
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        return node

    for name in local:
        defs[prefix + name] = rewrite(defs[prefix + name])
    return rewrite(schema)
