"""JSON schemas checked before compilation: fail closed on what the grammar would not enforce.

xgrammar turns a JSON schema into a grammar, and where it cannot express a
constraint it drops it without a word (``uniqueItems``, ``not``, ``oneOf``
treated as ``anyOf``, a ``pattern`` together with ``maxLength`` ...). Output
that breaks the schema it was promised is worse than a refusal, so
``prepare_schema`` raises ``SchemaError`` naming the keyword and where it
is; keywords that JSON Schema does not define (``x-...``, OpenAPI's
``discriminator``) constrain nothing and pass.
"""

from __future__ import annotations

from typing import Any

# Validation keywords (JSON Schema 2020-12 and earlier drafts) that the grammar does not enforce.
UNSUPPORTED = {
    "not": "'not' is not supported",
    "if": "'if' / 'then' / 'else' are not supported",
    "then": "'if' / 'then' / 'else' are not supported",
    "else": "'if' / 'then' / 'else' are not supported",
    "oneOf": "'oneOf' is not supported (use 'anyOf')",
    "dependentRequired": "'dependentRequired' is not supported",
    "dependentSchemas": "'dependentSchemas' is not supported",
    "dependencies": "'dependencies' is not supported",
    "uniqueItems": "'uniqueItems' is not supported",
    "contains": "'contains' is not supported",
    "minContains": "'minContains' is not supported",
    "maxContains": "'maxContains' is not supported",
    "$dynamicRef": "'$dynamicRef' is not supported",
    "$recursiveRef": "'$recursiveRef' is not supported",
}

# String formats the grammar enforces.
FORMATS = frozenset({
    "email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
    "uri-reference", "uri-template", "json-pointer", "relative-json-pointer",
})  # fmt: skip

_SUBSCHEMA = ("items", "additionalProperties", "additionalItems", "propertyNames",
              "unevaluatedProperties", "unevaluatedItems")  # fmt: skip
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "allOf", "prefixItems")

# Nesting deeper than this is refused: the walk (and xgrammar's) is recursive.
MAX_DEPTH = 64


class SchemaError(ValueError):
    """The schema asks for something the grammar cannot guarantee."""


def check_schema(schema: dict[str, Any] | bool) -> None:
    """Raise ``SchemaError`` if the grammar could not enforce all of ``schema``."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise SchemaError("a JSON schema must be an object or a boolean")
    _walk(schema, "#", 0)


def _walk(node: Any, path: str, depth: int) -> None:
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise SchemaError(f"{path}: a schema must be an object or a boolean, got {type(node).__name__}")
    if depth > MAX_DEPTH:
        raise SchemaError(f"{path}: the schema nests deeper than {MAX_DEPTH} levels")
    for key, why in UNSUPPORTED.items():
        if key in node:
            raise SchemaError(f"{path}: {why}")
    for key in ("unevaluatedProperties", "unevaluatedItems"):
        if key in node and node[key] is not False:
            raise SchemaError(f"{path}: '{key}' other than false is not supported")
    if "allOf" in node and (not isinstance(node["allOf"], list) or len(node["allOf"]) != 1):
        raise SchemaError(f"{path}: 'allOf' is supported with one schema only")
    if "items" in node and isinstance(node["items"], list):
        raise SchemaError(f"{path}: 'items' as a list is not supported (use 'prefixItems')")
    ref = node.get("$ref")
    if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
        raise SchemaError(f"{path}: only local references ('#/...') are supported, got $ref {ref!r}")
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if isinstance(node.get(key), bool):
            raise SchemaError(f"{path}: boolean '{key}' (draft 4) is not supported; give the bound as a number")
    _check_string(node, path)
    for key in _SUBSCHEMA:
        if key in node:
            _walk(node[key], f"{path}/{key}", depth + 1)
    for key in _SUBSCHEMA_MAPS:
        value = node.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise SchemaError(f"{path}/{key}: must be an object")
        for name, sub in value.items():
            _walk(sub, f"{path}/{key}/{name}", depth + 1)
    for key in _SUBSCHEMA_LISTS:
        value = node.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not value:
            raise SchemaError(f"{path}/{key}: must be a non-empty list of schemas")
        for i, sub in enumerate(value):
            _walk(sub, f"{path}/{key}/{i}", depth + 1)


def _check_string(node: dict[str, Any], path: str) -> None:
    fmt = node.get("format")
    if fmt is not None and _may_be_string(node) and fmt not in FORMATS:
        raise SchemaError(f"{path}: string format {fmt!r} is not supported (supported: {', '.join(sorted(FORMATS))})")
    lengths = "minLength" in node or "maxLength" in node
    generative = [k for k in ("pattern", "format") if k in node]
    if len(generative) == 2 and _may_be_string(node):
        raise SchemaError(f"{path}: 'pattern' together with 'format' is not supported")
    if lengths and generative and _may_be_string(node):
        raise SchemaError(f"{path}: '{generative[0]}' together with 'minLength' / 'maxLength' is not supported")
    for name in ("minLength", "maxLength"):
        v = node.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise SchemaError(f"{path}: '{name}' must be a non-negative integer")


def _may_be_string(node: dict[str, Any]) -> bool:
    t = node.get("type")
    return t is None or t == "string" or (isinstance(t, list) and "string" in t)
