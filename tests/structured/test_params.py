"""StructuredOutputsParams: one kind, checked types and sizes, a key, and binding without mutation."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
from pydantic import TypeAdapter

from tokenmill.core.request import SamplingParams
from tokenmill.structured.params import MAX_CHOICES, StructuredOutputsParams


@pytest.mark.parametrize(
    "fields, match",
    [
        ({}, "exactly one"),
        ({"regex": "a", "choice": ["a"]}, "exactly one"),
        ({"json": "{not json"}, "not valid JSON"),
        ({"json": "[1, 2]"}, "object or a boolean"),
        ({"json": 3}, "object or a boolean"),
        ({"regex": ""}, "non-empty string"),
        ({"choice": []}, "non-empty list"),
        ({"choice": ["a", ""]}, "non-empty list"),
        ({"choice": ["x"] * (MAX_CHOICES + 1)}, "at most"),
        ({"structural_tag": 5}, "object or a JSON string"),
    ],
)
def test_bad_specs_are_refused_by_name(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StructuredOutputsParams(**fields)


def test_kind_key_and_json_strings() -> None:
    p = StructuredOutputsParams(json='{"type": "integer"}')
    assert p.kind == "json"
    assert p.key() == ("json", '{"type": "integer"}', False)
    assert p.key(default_compact=True)[2] is True
    assert StructuredOutputsParams(json={"b": 1, "a": 2}).spec_text() == '{"b": 1, "a": 2}'  # key order kept
    assert StructuredOutputsParams(regex="x", disable_any_whitespace=False).key(default_compact=True)[2] is False


def test_bind_copies_and_leaves_the_original_alone() -> None:
    p = StructuredOutputsParams(regex="a+")
    owner = object()
    bound = p.bind("compiled", owner)
    assert bound is not p and p.compiled is None
    assert bound.compiled == "compiled" and bound.compiled_by is owner
    assert copy.deepcopy(bound).compiled == "compiled"  # the grammar is shared, not copied


def test_sampling_params_take_a_dict_and_refuse_ignore_eos() -> None:
    sp = SamplingParams(structured_outputs={"choice": ["yes", "no"]})
    assert isinstance(sp.structured_outputs, StructuredOutputsParams)
    assert replace(sp, n=1).structured_outputs is sp.structured_outputs
    with pytest.raises(ValueError, match="unknown field 'regexp'"):
        SamplingParams(structured_outputs={"regexp": "a"})
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(structured_outputs={"regex": "a"}, ignore_eos=True)
    parsed = TypeAdapter(SamplingParams).validate_python({"structured_outputs": {"json": {"type": "string"}}})
    assert parsed.structured_outputs.json == {"type": "string"}
