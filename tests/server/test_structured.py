"""Structured output and tool calls through the server, with the official ``openai`` client.

The server's model has random weights: only the grammar makes its output valid,
so every check here is one the grammar must win. Schemas are bounded (enums,
short strings, ranged integers) and the server runs with
``--disable-any-whitespace`` (a random model fills free whitespace without end),
so that every output ends well within ``max_tokens``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.server.helpers import MODEL_NAME, ServerProcess, assert_error_shape


@pytest.fixture(scope="module")
def server(server_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(server_model_dir, tmp_path_factory.mktemp("structured") / "server.log", "--disable-any-whitespace")
    proc.wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def openai_client(server: ServerProcess) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0, timeout=120.0)


MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "the forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


class Verdict(BaseModel):
    answer: Literal["yes", "no", "maybe"]
    confidence: int = Field(ge=0, le=100)
    reason: str = Field(max_length=12)


def test_parse_returns_the_pydantic_object(openai_client: Any) -> None:
    for seed in range(3):
        completion = openai_client.chat.completions.parse(
            model=MODEL_NAME, messages=MESSAGES, response_format=Verdict, max_tokens=120, seed=seed
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Verdict)
        assert Verdict.model_validate_json(choice.message.content) == choice.message.parsed


def test_required_tool_call_arguments_follow_the_schema(openai_client: Any) -> None:
    for seed in range(3):
        r = openai_client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=200, seed=seed
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls, choice.message
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_named_tool_choice_calls_that_function_once(openai_client: Any) -> None:
    for seed in range(3):
        r = openai_client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=200, seed=seed,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )  # fmt: skip
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls"
        assert [c.function.name for c in calls] == ["get_time"]
        jsonschema.validate(json.loads(calls[0].function.arguments), TIME)


def test_streamed_tool_call_deltas_reassemble_into_the_same_calls(openai_client: Any) -> None:
    kw = dict(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=200, seed=7)
    whole = openai_client.chat.completions.create(**kw).choices[0].message.tool_calls
    calls: dict[int, dict[str, Any]] = {}
    reasons = []
    content = ""
    for chunk in openai_client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            content += c.delta.content or ""
            if c.finish_reason is not None:
                reasons.append(c.finish_reason)
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                if d.id is not None:
                    assert call["id"] is None, "a call's id came twice"
                    call["id"] = d.id
                if d.function is not None:
                    call["name"] += d.function.name or ""
                    call["arguments"] += d.function.arguments or ""
    assert reasons == ["tool_calls"] and content == ""
    assert sorted(calls) == list(range(len(whole)))
    assert [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] == [
        (c.function.name, c.function.arguments) for c in whole
    ]
    assert all(c["id"] and c["id"].startswith("call_") for c in calls.values())


def test_parallel_tool_calls_false_gives_one_call(openai_client: Any) -> None:
    for seed in range(4):
        r = openai_client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="required",
            parallel_tool_calls=False, max_tokens=200, seed=seed,
        )  # fmt: skip
        assert len(r.choices[0].message.tool_calls) == 1


def test_tool_results_in_history_and_auto_without_a_call(openai_client: Any) -> None:
    # auto: the random model does not open a call, so its text is the content
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21"},
    ]  # fmt: skip
    r = openai_client.chat.completions.create(model=MODEL_NAME, messages=history, tools=TOOLS, max_tokens=8, seed=1)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None
    assert isinstance(choice.message.content, str)
    none = openai_client.chat.completions.create(
        model=MODEL_NAME, messages=history, tools=TOOLS, tool_choice="none", max_tokens=8, seed=1
    )
    assert none.choices[0].message.tool_calls is None


@pytest.mark.parametrize(
    "extra, check",
    [
        ({"guided_regex": r"[0-9]{3}-[a-z]{2,4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        ({"guided_choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
        ({"guided_json": TIME}, lambda t: jsonschema.validate(json.loads(t), TIME) is None),
        ({"structured_outputs": {"regex": r"(ab|cd){2,3}"}}, lambda t: re.fullmatch(r"(ab|cd){2,3}", t)),
        ({"structured_outputs": {"choice": ["x y", "z"]}}, lambda t: t in ("x y", "z")),
        ({"structured_outputs": {"grammar": 'root ::= "a" ("b" | "c")*  "."'}}, lambda t: re.fullmatch(r"a[bc]*\.", t)),
        ({"structured_outputs": {"json": WEATHER}}, lambda t: jsonschema.validate(json.loads(t), WEATHER) is None),
        ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict)),
    ],
    ids=["guided_regex", "guided_choice", "guided_json", "so.regex", "so.choice", "so.grammar", "so.json", "json_object"],
)
def test_completion_constraints_hold(openai_client: Any, extra: dict[str, Any], check: Any) -> None:
    r = openai_client.completions.create(
        model=MODEL_NAME, prompt="The answer:", max_tokens=120, n=3, seed=3, extra_body=extra
    )
    for c in r.choices:
        if "json_object" in str(extra) and c.finish_reason == "length":
            continue  # any object may nest without end; what did finish must parse
        assert c.finish_reason == "stop", c
        assert check(c.text), c.text


def test_json_schema_response_format_on_chat_streams_valid_json(openai_client: Any) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    text = ""
    for chunk in openai_client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, response_format=rf, max_tokens=120, seed=2, stream=True
    ):
        for c in chunk.choices:
            text += c.delta.content or ""
    jsonschema.validate(json.loads(text), WEATHER)


def _post(server: ServerProcess, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json={"model": MODEL_NAME, **body}, headers=server.headers, timeout=60)


CHAT = {"messages": MESSAGES, "max_tokens": 4}


@pytest.mark.parametrize(
    "path, body, param, words",
    [
        ("/v1/completions", {"prompt": "x", "guided_json": {"type": "object", "properties": 3}}, "guided_json", "properties"),
        ("/v1/completions", {"prompt": "x", "guided_regex": "a(b"}, "guided_regex", "guided_regex"),
        ("/v1/completions", {"prompt": "x", "structured_outputs": {"grammar": "root ::= undefined_rule"}},
         "structured_outputs.grammar", "undefined_rule"),
        ("/v1/completions", {"prompt": "x", "guided_json": {"type": "array", "uniqueItems": True}}, "guided_json", "uniqueItems"),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "not": {}}}}}, "response_format.json_schema.schema", "not"),
        ("/v1/chat/completions", {**CHAT, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice.function.name", "nope"),
        ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice", "tools"),
        ("/v1/chat/completions", {**CHAT, "guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "both"),
        ("/v1/completions", {"prompt": "x", "use_beam_search": True}, "use_beam_search", "use_beam_search"),
        ("/v1/completions", {"prompt": "x", "guided_decoding_backend": "outlines"}, "guided_decoding_backend", "outlines"),
    ],
    ids=["bad-schema", "bad-regex", "bad-grammar", "unenforceable-schema", "not", "unknown-function",
         "required-without-tools", "two-constraints", "beam-search", "backend"],
)  # fmt: skip
def test_bad_specs_are_400s_naming_the_problem_and_the_server_keeps_serving(
    server: ServerProcess, path: str, body: dict[str, Any], param: str, words: str
) -> None:
    err = assert_error_shape(_post(server, path, body), 400, type="invalid_request_error")
    assert err["param"] == param, err
    assert words in err["message"], err
    ok = _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 8, "guided_choice": ["fine"]})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "fine"
