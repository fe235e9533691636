"""Service methods as people read them: `create(name: str, memory: int = 0) -> InstanceInfo`.

Services publish each method's request and response types as msgspec JSON schemas; this turns
them back into a signature: a struct request's fields become the parameters (with their
defaults), anything else one parameter; the response is its type's name.
"""

from __future__ import annotations

import json
from typing import Any

from multikernel.protocol import MethodInfo

_SIMPLE = {"string": "str", "integer": "int", "number": "float", "boolean": "bool", "null": "None"}


def parse(schema: str) -> dict[str, Any]:
    if not schema:
        return {}
    try:
        parsed = json.loads(schema)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def type_of(schema: dict[str, Any]) -> str:
    """A schema as a type expression: `list[int]`, `str | None`, `InstanceInfo`, `Any`."""
    if ref := schema.get("$ref"):
        return str(ref).rpartition("/")[2]
    if options := schema.get("anyOf") or schema.get("oneOf"):
        return " | ".join(type_of(option) for option in options)
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(_SIMPLE.get(k, str(k)) for k in kind)
    if kind == "array":
        items = schema.get("items") or (schema.get("prefixItems") or [{}])[0]
        return f"list[{type_of(items)}]"
    if kind == "object":
        values = schema.get("additionalProperties")
        return f"dict[str, {type_of(values)}]" if isinstance(values, dict) else "dict"
    return _SIMPLE.get(str(kind), "Any") if kind else "Any"


def signature(method: MethodInfo) -> str:
    """`name(params) -> Response` for one method."""
    request, response = parse(method.request_schema), parse(method.response_schema)
    return f"{method.name}({_parameters(request)}) -> {type_of(response) if response else 'Any'}"


def _parameters(schema: dict[str, Any]) -> str:
    if not schema:
        return "Any"
    if schema.get("type") == "null":
        return ""
    ref = schema.get("$ref", "")
    struct = schema.get("$defs", {}).get(str(ref).rpartition("/")[2]) if ref else None
    if not isinstance(struct, dict) or struct.get("type") != "object":
        return type_of(schema)
    required = set(struct.get("required", ()))
    params = []
    for name, field in struct.get("properties", {}).items():
        text = f"{name}: {type_of(field)}"
        if name not in required:
            text += f" = {json.dumps(field.get('default'))}" if "default" in field else " = ..."
        params.append(text)
    return ", ".join(params)


def schemas(method: MethodInfo) -> dict[str, Any]:
    """The method's schemas as JSON values (for `-o json`), not escaped strings."""
    return {
        "name": method.name,
        "signature": signature(method),
        "request": parse(method.request_schema),
        "response": parse(method.response_schema),
    }
