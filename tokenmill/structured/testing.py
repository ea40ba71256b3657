"""Seeded random JSON schemas, for tests and benchmarks of structured output.

``random_schema(rng)`` draws an object schema of the kinds users send:
nested objects, arrays with bounds, enums, numbers with ranges, strings with
patterns or length bounds, optional fields. Strings and arrays are bounded, so
that a model that follows the grammar can finish within a few hundred tokens.
"""

from __future__ import annotations

import random
from typing import Any

_WORDS = ["alpha", "beta", "gamma", "delta", "red", "green", "blue", "north", "south", "yes", "no", "maybe so"]
_PATTERNS = [r"^[a-z]{1,8}$", r"^[A-Z][a-z]{0,6}$", r"^\d{3}-\d{4}$", r"^(foo|bar|baz)\d?$", r"^[a-f0-9]{4,8}$"]
# Formats whose every string the grammar allows a format checker takes too ("date" allows
# 02-31: RFC 3339's grammar does not know the months).
_FORMATS = ["uuid", "email"]


def random_schema(rng: random.Random, depth: int = 0, max_depth: int = 2) -> dict[str, Any]:
    """An object schema with 1-4 properties, some of them optional."""
    n = rng.randint(1, 4)
    props = {f"{rng.choice(_WORDS).replace(' ', '_')}_{i}": _value(rng, depth + 1, max_depth) for i in range(n)}
    names = list(props)
    required = [k for k in names if rng.random() < 0.7] or names[:1]
    schema: dict[str, Any] = {"type": "object", "properties": props, "required": required}
    if rng.random() < 0.7:
        schema["additionalProperties"] = False
    return schema


def _value(rng: random.Random, depth: int, max_depth: int) -> dict[str, Any]:
    kinds = ["integer", "number", "string", "pattern", "enum", "boolean", "format", "nullable"]
    if depth < max_depth:
        kinds += ["object", "array"]
    kind = rng.choice(kinds)
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 200)}
    if kind == "number":
        lo = round(rng.uniform(-10, 10), 2)
        out: dict[str, Any] = {"type": "number", "minimum": lo}
        if rng.random() < 0.7:
            out["maximum"] = lo + rng.randint(1, 100)
        return out
    if kind == "string":
        lo = rng.randint(0, 3)
        return {"type": "string", "minLength": lo, "maxLength": lo + rng.randint(1, 12)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(_PATTERNS)}
    if kind == "format":
        return {"type": "string", "format": rng.choice(_FORMATS)}
    if kind == "enum":
        values: list[Any] = rng.sample(_WORDS, rng.randint(1, 4))
        if rng.random() < 0.3:
            values.append(rng.randint(0, 9))
        return {"enum": values}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "nullable":
        return {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "null"}]}
    if kind == "object":
        return random_schema(rng, depth, max_depth)
    lo = rng.randint(0, 2)
    return {"type": "array", "items": _value(rng, depth + 1, max_depth), "minItems": lo, "maxItems": lo + rng.randint(0, 3)}
