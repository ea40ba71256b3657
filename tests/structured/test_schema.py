"""Schemas are refused, by keyword and place, where the grammar would not enforce them."""

from __future__ import annotations

import pytest

from tokenmill.structured.schema import SchemaError, check_schema


@pytest.mark.parametrize(
    "schema, match",
    [
        ({"type": "array", "uniqueItems": True}, "#: 'uniqueItems'"),
        ({"oneOf": [{"type": "integer"}]}, "'oneOf' is not supported"),
        ({"properties": {"a": {"not": {"type": "string"}}}}, "#/properties/a: 'not'"),
        ({"if": {"type": "integer"}, "then": {"minimum": 1}}, "'if'"),
        ({"allOf": [{"type": "integer"}, {"minimum": 1}]}, "'allOf' is supported with one schema only"),
        ({"type": "array", "contains": {"const": 1}}, "'contains'"),
        ({"dependentRequired": {"a": ["b"]}}, "'dependentRequired'"),
        ({"$ref": "https://example.com/s.json"}, "only local references"),
        ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "'pattern' together with 'minLength'"),
        ({"type": "string", "format": "email", "minLength": 3}, "'format' together with"),
        ({"type": "string", "format": "color"}, "string format 'color' is not supported"),
        ({"type": "number", "exclusiveMinimum": True, "minimum": 0}, "boolean 'exclusiveMinimum'"),
        ({"type": "array", "items": [{"type": "integer"}]}, "'items' as a list"),
        ({"unevaluatedProperties": {"type": "integer"}}, "'unevaluatedProperties' other than false"),
        ({"$defs": {"x": {"uniqueItems": True}}}, "#/\\$defs/x"),
        ({"anyOf": [{"type": "string", "maxLength": -1}]}, "#/anyOf/0: 'maxLength' must be"),
        ({"properties": {"a": 3}}, "#/properties/a: a schema must be"),
    ],
)
def test_unenforceable_schemas_are_refused(schema: dict, match: str) -> None:
    with pytest.raises(SchemaError, match=match):
        check_schema(schema)


@pytest.mark.parametrize(
    "schema",
    [
        True,
        {},
        {"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}}, "required": ["a"],
         "additionalProperties": False, "title": "T", "description": "d", "x-extension": 1, "discriminator": {}},
        {"$defs": {"p": {"type": "integer"}}, "anyOf": [{"$ref": "#/$defs/p"}, {"type": "null"}]},
        {"allOf": [{"$ref": "#/definitions/p"}], "definitions": {"p": {"enum": [1, 2]}}},
        {"type": "string", "format": "date-time"},
        {"type": "array", "prefixItems": [{"type": "integer"}], "items": False, "minItems": 1},
        {"type": "object", "patternProperties": {"^x": {"type": "integer"}}, "unevaluatedProperties": False},
        {"type": "integer", "multipleOf": 3, "exclusiveMaximum": 10},
    ],  # fmt: skip
)
def test_enforceable_schemas_pass(schema: dict | bool) -> None:
    check_schema(schema)
