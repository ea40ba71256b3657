"""Tool calls in the model's own syntax: the grammar that forces them and the parser that reads them.

A tool-call format says how a model writes a call; ``hermes`` (NousResearch's
Hermes, Qwen2.5/3, and tokenmill's bundled model) writes each call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

``tool_call_tag`` builds an xgrammar structural tag for it: with
``tool_choice`` ``required`` (or a named function) the output is one or more
calls and nothing else, each call's arguments constrained by its function's
JSON schema; with ``auto`` and strict functions, free text until the model
opens a call, whose arguments are then constrained. ``ToolCallParser`` turns
the text back into calls (``parse`` for a whole output, ``feed`` for a
stream: a call is handed out once its closing tag has arrived, text outside
calls as it comes, held back only while it could be the start of a call). A
call block that does not parse as a call stays in the content, as written.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from tokenmill.structured.schema import check_schema


@dataclass(frozen=True)
class ToolCallFormat:
    name: str
    begin: str  # opens a call (and is what the parser looks for)
    end: str  # closes it
    separator: str  # between calls when nothing else may be written


HERMES = ToolCallFormat("hermes", "<tool_call>", "</tool_call>", "\n")
TOOL_CALL_FORMATS = {"hermes": HERMES}


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call: its name and the JSON schema of its arguments (None: any object)."""

    name: str
    parameters: dict[str, Any] | None = None
    strict: bool = False


@dataclass
class ToolCall:
    name: str
    arguments: str  # the arguments as the model wrote them (a JSON object)
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


# Arguments of a function without a schema: any object (xgrammar's strict mode would
# otherwise allow only the properties a schema lists, which are none).
_ANY_OBJECT = {"type": "object", "additionalProperties": True}


def tool_call_tag(
    tools: list[ToolSpec], *, required: bool, parallel: bool = True, fmt: ToolCallFormat = HERMES
) -> dict[str, Any]:
    """An xgrammar structural tag for calls to ``tools`` in ``fmt``.

    ``required``: the output is one or more calls (one if not ``parallel``), nothing
    else; otherwise free text in which each call the model opens is constrained.
    Raises ``SchemaError`` for a schema whose constraints the grammar cannot enforce.
    """
    if fmt is not HERMES:
        raise ValueError(f"no grammar for tool-call format {fmt.name!r}")
    tags = []
    for tool in tools:
        schema = tool.parameters if tool.parameters is not None else _ANY_OBJECT
        check_schema(schema)
        content = {"type": "json_schema", "json_schema": schema}
        tags.append({
            "type": "tag",
            "begin": f'{fmt.begin}\n{{"name": {json.dumps(tool.name)}, "arguments": ',
            "content": content,
            "end": f"}}\n{fmt.end}",
        })  # fmt: skip
    if required:
        form: dict[str, Any] = {"type": "tags_with_separator", "tags": tags, "separator": fmt.separator,
                                "at_least_one": True, "stop_after_first": not parallel}  # fmt: skip
    else:
        form = {"type": "triggered_tags", "triggers": [fmt.begin], "tags": tags, "at_least_one": False,
                "stop_after_first": not parallel}  # fmt: skip
    return {"type": "structural_tag", "format": form}


def parse_call(block: str) -> ToolCall | None:
    """A call from the JSON between a call's tags, or None if it is not one.

    The arguments keep the model's own text (so a stream and the final message
    agree on them byte for byte); they must be a JSON object.
    """
    text = block.strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters"))
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], _raw_arguments(text) or json.dumps(args, ensure_ascii=False))


def _raw_arguments(text: str) -> str | None:
    """The text of the ``arguments`` value inside a call object, as written."""
    decoder = json.JSONDecoder()
    i = 1  # after "{"
    n = len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "}":
            return None
        key, i = decoder.raw_decode(text, i)
        while i < n and text[i] in " \t\r\n:":
            i += 1
        start = i
        value, i = decoder.raw_decode(text, i)
        if key in ("arguments", "parameters") and isinstance(value, dict):
            return text[start:i]
    return None


class ToolCallParser:
    """Splits a model's output into content and tool calls (see the module docstring)."""

    def __init__(self, fmt: ToolCallFormat = HERMES, *, max_calls: int | None = None) -> None:
        self.fmt = fmt
        self.max_calls = max_calls  # parallel_tool_calls=false: 1; later calls stay content
        self._buffer = ""
        self._in_call = False
        self.calls: list[ToolCall] = []

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a whole output."""
        content, calls = self.feed(text)
        rest, more = self.flush()
        return content + rest, calls + more

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        """The content and the complete calls that ``delta`` brings, in order of arrival
        (content first when both come in one delta). Whitespace between or after calls
        is not content."""
        buf = self._buffer + delta
        content: list[str] = []
        calls: list[ToolCall] = []
        begin, end_tag = self.fmt.begin, self.fmt.end
        while True:
            if not self._in_call:
                at = buf.find(begin)
                if at < 0:
                    keep = _partial_suffix(buf, begin)
                    out = buf[: len(buf) - keep]
                    if not (self.calls and not out.strip()):  # else: hold whitespace after a call
                        content.append(out)
                        buf = buf[len(buf) - keep :]
                    break
                if not (self.calls and not buf[:at].strip()):
                    content.append(buf[:at])
                buf = buf[at:]
                self._in_call = True
            end = buf.find(end_tag)
            if end < 0:
                break
            block, buf = buf[: end + len(end_tag)], buf[end + len(end_tag) :]
            self._in_call = False
            call = None
            if self.max_calls is None or len(self.calls) < self.max_calls:
                call = parse_call(block[len(begin) : -len(end_tag)])
            if call is None:
                content.append(block)
            else:
                self.calls.append(call)
                calls.append(call)
        self._buffer = buf
        return "".join(content), calls

    def flush(self) -> tuple[str, list[ToolCall]]:
        """What is left at the end of the output: an unclosed call stays content."""
        rest, self._buffer, self._in_call = self._buffer, "", False
        if self.calls and not rest.strip():
            rest = ""
        return rest, []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
