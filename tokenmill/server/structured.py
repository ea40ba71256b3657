"""Structured output and tools in requests: from the body to a compiled spec and a tool plan.

A request constrains its output through one of: OpenAI's ``response_format``
(``json_object``; ``json_schema``, always enforced whether ``strict`` or not),
vLLM's ``structured_outputs`` (``json``, ``regex``, ``choice``, ``grammar``,
``json_object``, ``structural_tag``) or its older ``guided_json`` /
``guided_regex`` / ``guided_choice`` / ``guided_grammar``; two at once are a
400 naming both.

Tools (chat only): ``tool_choice`` ``none`` hides the tools from the template
and parses nothing; ``auto`` (the default with tools) shows them to the
template and parses the model's calls (``--tool-call-parser``, Hermes
``<tool_call>`` blocks) into ``message.tool_calls``; if some function is
``strict``, calls the model opens are also constrained to their schemas.
``required`` and a named function constrain the whole output to calls (to
that function), arguments following each function's schema.
``parallel_tool_calls: false`` allows one call.

The spec is compiled on the prompt thread pool (``compile_spec``), before the
request reaches the engine: a spec the grammar cannot enforce is a 400 that
names the parameter and the problem, and the engine never waits on a compile.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from tokenmill.server.errors import APIError, bad_request
from tokenmill.server.protocol import ChatCompletionRequest, SamplingFields
from tokenmill.structured.params import StructuredOutputsParams
from tokenmill.structured.schema import SchemaError, check_schema
from tokenmill.structured.tools import TOOL_CALL_FORMATS, ToolCallParser, ToolSpec, tool_call_tag

GRAMMAR_BACKENDS = (None, "auto", "xgrammar")


@dataclass
class ToolPlan:
    """What the handler does with a chat request's tools."""

    choice: str  # none | auto | required | function
    template_tools: list[dict[str, Any]] | None = None  # what the chat template sees
    parser_format: str | None = None  # None: the output is not parsed for calls
    max_calls: int | None = None
    names: set[str] = field(default_factory=set)
    function: str | None = None  # the function a named tool_choice forces

    def parser(self) -> ToolCallParser | None:
        if self.parser_format is None:
            return None
        return ToolCallParser(TOOL_CALL_FORMATS[self.parser_format], max_calls=self.max_calls)


@dataclass
class StructuredRequest:
    spec: StructuredOutputsParams | None  # what constrains the output, if anything
    param: str  # the request parameter it came from (for errors)
    tools: ToolPlan | None = None


def structured_request(body: SamplingFields, tool_call_parser: str | None = "hermes") -> StructuredRequest:
    """The request's output constraint and tool plan; a 400 naming the parameter if invalid."""
    sources: list[tuple[str, StructuredOutputsParams]] = []
    rf = body.response_format
    if rf is not None and rf.type != "text":
        if rf.type == "json_object":
            sources.append(("response_format", _spec("response_format", json_object=True)))
        else:
            js = rf.json_schema
            if js is None:
                raise bad_request("response_format type 'json_schema' needs 'json_schema'", "response_format.json_schema")
            spec = (_spec("response_format.json_schema.schema", json=js.schema_) if js.schema_ is not None
                    else _spec("response_format.json_schema", json_object=True))  # fmt: skip
            sources.append(("response_format.json_schema.schema", spec))
    so = body.structured_outputs
    if so is not None:
        if so.whitespace_pattern is not None:
            raise bad_request("structured_outputs.whitespace_pattern is not supported", "structured_outputs.whitespace_pattern")
        fields = {"json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar,
                  "json_object": so.json_object, "structural_tag": so.structural_tag}  # fmt: skip
        given = [k for k, v in fields.items() if v is not None and v is not False]
        param = f"structured_outputs.{given[0]}" if len(given) == 1 else "structured_outputs"
        sources.append((param, _spec(param, **{k: fields[k] for k in given},
                                     disable_any_whitespace=so.disable_any_whitespace)))  # fmt: skip
    guided = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
    for name, kind in guided.items():
        value = getattr(body, name)
        if value is not None:
            sources.append((name, _spec(name, **{kind: value})))
    if body.guided_decoding_backend not in GRAMMAR_BACKENDS:
        raise bad_request(
            f"guided_decoding_backend {body.guided_decoding_backend!r} is not available; tokenmill uses xgrammar",
            "guided_decoding_backend",
        )
    tools = _tool_plan(body, tool_call_parser) if isinstance(body, ChatCompletionRequest) else None
    if tools is not None:
        assert isinstance(body, ChatCompletionRequest)
        tag = _tool_spec(body, tools)
        if tag is not None:
            if sources:  # both would constrain the whole output
                raise bad_request(f"{sources[0][0]} cannot be combined with tool_choice {tools.choice!r}"
                                  " (or strict tools)", sources[0][0])  # fmt: skip
            sources.append(("tools", tag))
    if len(sources) > 1:
        raise bad_request(
            f"{sources[0][0]} and {sources[1][0]} both constrain the output; give one", sources[1][0]
        )
    if not sources:
        return StructuredRequest(None, "", tools)
    param, spec = sources[0]
    return StructuredRequest(spec, param, tools)


def _spec(param: str, **fields: Any) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**fields)
    except ValueError as exc:
        raise bad_request(str(exc).replace("structured_outputs", param, 1) if param != "structured_outputs"
                          else str(exc), param) from None  # fmt: skip


def _tool_plan(body: ChatCompletionRequest, parser: str | None) -> ToolPlan | None:
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    names = [t.function.name for t in body.tools]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise bad_request(f"tools: function {dup!r} is given twice", "tools")
    for i, tool in enumerate(body.tools):
        params = tool.function.parameters
        if params is not None:
            try:
                check_schema(params)
            except SchemaError as exc:
                raise bad_request(f"tools[{i}].function.parameters: {exc}", f"tools[{i}].function.parameters") from None
    template_tools = [t.model_dump(exclude_none=True) for t in body.tools]
    for t in template_tools:
        # the template shows the arguments' schema under its OpenAI name
        fn = t["function"]
        if "parameters" not in fn:
            fn["parameters"] = {"type": "object", "properties": {}}
    max_calls = 1 if body.parallel_tool_calls is False else None
    if choice is None:
        choice = "auto"
    if choice == "none":
        return ToolPlan("none", None, None, names=set(names))
    if not isinstance(choice, str):  # a named function
        if choice.function.name not in names:
            raise bad_request(
                f"tool_choice names function {choice.function.name!r}, which is not in tools "
                f"({', '.join(names)})", "tool_choice.function.name",
            )
        return ToolPlan("function", template_tools, parser or "hermes", 1, set(names), choice.function.name)
    if choice == "auto" and parser is None:
        raise bad_request(
            "tool_choice 'auto' needs a tool-call parser: start the server with --tool-call-parser", "tool_choice"
        )
    return ToolPlan(choice, template_tools, parser or "hermes", max_calls, set(names))


def _tool_spec(body: ChatCompletionRequest, plan: ToolPlan) -> StructuredOutputsParams | None:
    """The structural tag that constrains the calls, or None when nothing is constrained."""
    assert body.tools is not None
    specs = [ToolSpec(t.function.name, t.function.parameters, bool(t.function.strict)) for t in body.tools]
    if plan.choice == "none":
        return None
    if plan.choice == "auto":
        if not any(s.strict for s in specs):
            return None
        tag = tool_call_tag([s for s in specs], required=False, parallel=plan.max_calls is None)
    elif plan.choice == "required":
        tag = tool_call_tag(specs, required=True, parallel=plan.max_calls is None)
    else:
        tag = tool_call_tag([s for s in specs if s.name == plan.function], required=True, parallel=False)
    return StructuredOutputsParams(structural_tag=tag)


def compile_spec(
    engine: Any, request: StructuredRequest, *, cancel: threading.Event
) -> StructuredOutputsParams | None:
    """The request's spec bound to its compiled grammar (runs on the prompt pool)."""
    from tokenmill.structured.compiler import GrammarError

    if request.spec is None or cancel.is_set():
        return request.spec
    try:
        return engine.grammar_compiler.compile(request.spec)
    except GrammarError as exc:
        raise APIError(400, f"{request.param}: {exc.detail}", param=request.param, code="invalid_grammar") from None
