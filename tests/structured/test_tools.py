"""Tool calls: the Hermes parser (whole outputs and streams) and the grammar that forces calls."""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import pytest

from tests.structured.walk import walk
from tokenmill.structured.params import StructuredOutputsParams as Spec
from tokenmill.structured.schema import SchemaError
from tokenmill.structured.tools import ToolCallParser, ToolSpec, parse_call, tool_call_tag

TEXT = (
    "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris}\", \"days\": [1, 2]}}\n"
    "</tool_call>\n<tool_call>\n{\"name\": \"noop\", \"arguments\": {}}\n</tool_call>"
)


def test_parse_splits_content_and_calls_keeping_the_arguments_text() -> None:
    content, calls = ToolCallParser().parse(TEXT)
    assert content == "Let me look.\n"
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", '{"city": "Paris}", "days": [1, 2]}'), ("noop", "{}")
    ]  # fmt: skip
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize("step", [1, 2, 3, 5, 7, 11, 64])
def test_a_stream_in_any_pieces_gives_the_same_content_and_calls(step: int) -> None:
    parser = ToolCallParser()
    content, calls = "", []
    for i in range(0, len(TEXT), step):
        text, new = parser.feed(TEXT[i : i + step])
        content += text
        calls += new
    rest, _ = parser.flush()
    whole_content, whole_calls = ToolCallParser().parse(TEXT)
    assert content + rest == whole_content
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]


def test_text_that_is_not_a_call_stays_content() -> None:
    for text in ["<tool_call>{not json}</tool_call>", "<tool_call>[1]</tool_call>",
                 '<tool_call>{"name": "f", "arguments": 3}</tool_call>', "a <tool_cal b", "<tool_call>{\"name\": \"f\""]:  # fmt: skip
        assert ToolCallParser().parse(text) == (text, [])
    assert parse_call('{"name": "f", "parameters": {"x": 1}}').arguments == '{"x": 1}'


def test_max_calls_leaves_later_calls_in_the_content() -> None:
    content, calls = ToolCallParser(max_calls=1).parse(TEXT)
    assert [c.name for c in calls] == ["get_weather"]
    assert "noop" in content


TOOLS = [
    ToolSpec("get_weather", {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                              "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                             "required": ["city", "days"], "additionalProperties": False}),
    ToolSpec("noop", None),
]  # fmt: skip


@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_are_all_there_is_and_follow_their_schemas(
    compiler: Any, bundled_tokenizer: Any, parallel: bool
) -> None:
    spec = Spec(structural_tag=tool_call_tag(TOOLS, required=True, parallel=parallel), disable_any_whitespace=True)
    compiled = compiler.compiled_grammar(spec)
    rng = random.Random(1)
    seen = 0
    for _ in range(20):
        text, done = walk(compiler, compiled, bundled_tokenizer, rng, max_tokens=400)
        if not done:
            continue
        content, calls = ToolCallParser().parse(text)
        assert content == "" and calls, text
        assert parallel or len(calls) == 1
        for call in calls:
            schema = {t.name: t for t in TOOLS}[call.name].parameters or {"type": "object"}
            jsonschema.validate(json.loads(call.arguments), schema)
        seen += 1
    assert seen >= 10


def test_a_tool_schema_the_grammar_cannot_enforce_is_refused() -> None:
    with pytest.raises(SchemaError, match="uniqueItems"):
        tool_call_tag([ToolSpec("f", {"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}})],
                      required=True)  # fmt: skip
