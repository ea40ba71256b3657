"""What a request asks its output to be: a JSON schema, any JSON, a regex, a choice, a grammar.

``StructuredOutputsParams`` is plain data (vLLM's offline names): the core
carries it in ``SamplingParams`` and never looks inside. Exactly one kind is
set. ``compiled`` is the grammar the engine compiled for it (``compiler.py``),
attached to a copy made by ``bind``, so a user's params object is never changed.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

# Bounds on a spec's size: the server's body limit is smaller by default, but the
# offline API has none, and compile time grows with the spec.
MAX_SPEC_CHARS = 1 << 20
MAX_CHOICES = 1024

KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """One of: ``json`` (a JSON schema, as a dict, a bool or a JSON string), ``json_object``
    (any JSON object), ``regex``, ``choice`` (one of these strings, verbatim), ``grammar``
    (xgrammar's EBNF, ``root ::= ...``, or a Lark grammar), ``structural_tag`` (xgrammar's
    structural tag, as a dict or a JSON string; tool calls use it).

    ``disable_any_whitespace``: JSON without free whitespace between tokens (vLLM's
    option), which small models tend to fill without end; None takes the engine's
    default (``EngineConfig.structured_disable_any_whitespace``, off unless set).
    """

    json: dict[str, Any] | bool | str | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: dict[str, Any] | str | None = None
    disable_any_whitespace: bool | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kind(self) -> str:
        for name in KINDS:
            value = getattr(self, name)
            if value is not None and value is not False:
                return name
        raise ValueError("structured_outputs needs one of: " + ", ".join(KINDS))

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field at fault (types and sizes; the grammar
        itself is checked when it is compiled)."""
        kinds = [k for k in KINDS if getattr(self, k) is not None and getattr(self, k) is not False]
        if len(kinds) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of " + ", ".join(KINDS) + f", got {kinds or 'none'}"
            )
        kind = kinds[0]
        value = getattr(self, kind)
        if kind == "json":
            if isinstance(value, str):
                try:
                    parsed = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
                if not isinstance(parsed, dict | bool):
                    raise ValueError("structured_outputs.json must be a JSON schema (an object or a boolean)")
            elif not isinstance(value, dict | bool):
                raise ValueError("structured_outputs.json must be a JSON schema (an object or a boolean)")
        elif kind == "json_object":
            if value is not True:
                raise ValueError("structured_outputs.json_object must be true")
        elif kind in ("regex", "grammar"):
            if not isinstance(value, str) or not value:
                raise ValueError(f"structured_outputs.{kind} must be a non-empty string")
        elif kind == "choice":
            if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
            if len(value) > MAX_CHOICES:
                raise ValueError(f"structured_outputs.choice has {len(value)} choices; at most {MAX_CHOICES}")
        elif kind == "structural_tag" and not isinstance(value, dict | str):
            raise ValueError("structured_outputs.structural_tag must be an object or a JSON string")
        if len(self.spec_text()) > MAX_SPEC_CHARS:
            raise ValueError(f"structured_outputs.{kind} is longer than {MAX_SPEC_CHARS} characters")

    def spec_text(self) -> str:
        """The spec as one string (schemas keep their key order: it is the output's)."""
        value = getattr(self, self.kind)
        if self.kind == "choice":
            return json.dumps(value)
        if isinstance(value, str):
            return value
        return json.dumps(value, ensure_ascii=False)

    def key(self, default_compact: bool = False) -> tuple[str, str, bool]:
        """What the compiled grammar depends on: equal keys compile to the same grammar."""
        compact = default_compact if self.disable_any_whitespace is None else self.disable_any_whitespace
        return (self.kind, self.spec_text(), compact)

    # -- the compiled grammar, attached by the engine ----------------------------------

    @property
    def compiled(self) -> Any:
        """The compiled grammar (an ``xgrammar.CompiledGrammar``), once ``bind`` attached it."""
        return getattr(self, "_compiled", None)

    @property
    def compiled_by(self) -> Any:
        """The compiler that made ``compiled`` (grammars depend on the tokenizer)."""
        return getattr(self, "_compiled_by", None)

    def bind(self, compiled: Any, compiler: Any) -> StructuredOutputsParams:
        """A copy carrying ``compiled``; this object is left as it was."""
        bound = copy.copy(self)
        bound._compiled = compiled  # type: ignore[attr-defined]
        bound._compiled_by = compiler  # type: ignore[attr-defined]
        return bound

    def __deepcopy__(self, memo: dict[int, Any]) -> StructuredOutputsParams:
        # the compiled grammar is immutable and shared; the spec is copied
        out = copy.copy(self)
        for name in KINDS:
            setattr(out, name, copy.deepcopy(getattr(self, name), memo))
        return out
