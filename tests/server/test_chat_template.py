"""The bounded template sandbox: the same text as transformers for real templates, and bounds that hold."""

from __future__ import annotations

import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tokenmill.server.chat_template import (
    TemplateError,
    TemplateLimitError,
    TemplateLimits,
    TemplateRefusal,
    render_chat_template,
)

# Qwen2.5's template (tools, tool calls and consecutive tool results; attribute access on dicts).
CHATML_TOOLS = """
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

# Llama 3.1's shape: bos_token, strftime_now, slicing, trim, raise_exception, `in` on a dict.
LLAMA31 = """
{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' }}{{- tool_call.arguments | tojson }}{{- "}<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}{{- message.content | tojson }}
        {%- else %}{{- message.content }}{%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""

# Mistral's: strict user/assistant alternation enforced with raise_exception.
MISTRAL = """
{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}
{%- else %}{%- set loop_messages = messages %}{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}
    {%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}
    {%- else %}{{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"""

# The rest of what templates use: macros, namespaces, loop controls, generation tags, filters, formats.
FEATURES = """
{%- macro show(m) -%}<{{ m.role | upper }}>{{ m.content | trim | replace('  ', ' ') }}{%- endmacro -%}
{%- set ns = namespace(users=0, last=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.users = ns.users + 1 -%}{%- set ns.last = loop.index0 -%}{%- endif -%}{%- endfor -%}
users={{ ns.users }} last={{ ns.last }} roles={{ messages | map(attribute='role') | join(',') }}
{% for m in messages[::-1] -%}
{%- if loop.index > 3 %}{% break %}{% endif -%}
{%- if m.role == 'system' %}{% continue %}{% endif -%}
[{{ loop.cycle('a', 'b') }}{{ show(m) }}]
{% endfor -%}
{%- set header -%}{% for k, v in {'x': 1, 'y': 2} | dictsort %}{{ k }}={{ v }};{% endfor %}{%- endset -%}
{{ header }} {{ '%s-%d' | format('p', 3) }} {{ '{}+{}'.format(1, 2) }} {{ 'a' ~ 1 ~ none }} {{ dict(a=1) | tojson }}
{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% endif %}{% endfor %}
{{ messages | selectattr('role', 'equalto', 'user') | list | length }} {{ messages[-1].content.split()[0] }} {{ messages[-1].content.startswith('W') }}
{{ extra_var | default('no-extra') }} {{ range(3) | list }} {{ [1, 2] + [3] }} {{ 'ab' * 3 }} {{ 2 ** 10 }} {{ 7 // 2 }} {{ 10 % 3 }} {{ messages | length is divisibleby 2 }}
{%- if add_generation_prompt %}<ASSISTANT>{% endif -%}
"""

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is the weather?"}],
    [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": "Hi  there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What now?"},
    ],
]
TOOL_CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                          "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "Sunny"},
    {"role": "assistant", "content": "Sunny."},
    {"role": "user", "content": "What else?"},
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(server_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(server_model_dir)


def _both(tokenizer: Any, template: str, messages: list[dict[str, Any]], **kw: Any) -> tuple[str, str]:
    expected = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kw)
    add = kw.pop("add_generation_prompt", False)
    cont = kw.pop("continue_final_message", False)
    ours = render_chat_template(
        template, messages, add_generation_prompt=add, continue_final_message=cont,
        variables={**tokenizer.special_tokens_map, **kw},
    )  # fmt: skip
    return ours, expected


@pytest.mark.parametrize("name", ["chatml_tools", "llama31", "mistral", "features", "bundled", "tiny"])
def test_same_text_as_transformers(tokenizer: Any, name: str) -> None:
    from tests.conftest import CHAT_TEMPLATE

    if name == "bundled":
        from transformers import AutoTokenizer

        from tokenmill.models import DEFAULT_MODEL_PATH

        template = AutoTokenizer.from_pretrained(DEFAULT_MODEL_PATH).chat_template
    else:
        template = {"chatml_tools": CHATML_TOOLS, "llama31": LLAMA31, "mistral": MISTRAL, "features": FEATURES,
                    "tiny": CHAT_TEMPLATE}[name]  # fmt: skip
    conversations = [*CONVERSATIONS]
    if name in ("chatml_tools", "bundled"):
        conversations.append(TOOL_CONVERSATION)
    for messages in conversations:
        for add in (False, True):
            ours, expected = _both(tokenizer, template, messages, add_generation_prompt=add, date_string="26 Jul 2024")
            assert ours == expected, (name, messages)
    if name == "features":
        ours, expected = _both(tokenizer, template, CONVERSATIONS[1], extra_var="given")
        assert ours == expected and "given" in ours


def test_strftime_now_and_continue_final_message(tokenizer: Any) -> None:
    today = datetime.now().strftime("%d %b %Y")
    out = render_chat_template(LLAMA31, CONVERSATIONS[0], add_generation_prompt=True, variables={"bos_token": "<s>"})
    assert f"Today Date: {today}" in out or "Today Date:" in out  # midnight may pass between the two calls
    messages = [{"role": "user", "content": "Write a verse"}, {"role": "assistant", "content": "In the beginning"}]
    ours, expected = _both(tokenizer, CHATML_TOOLS, messages, continue_final_message=True)
    assert ours == expected and ours.endswith("In the beginning")


def test_template_refusals_and_errors() -> None:
    with pytest.raises(TemplateRefusal, match="roles must alternate"):
        render_chat_template(MISTRAL, [{"role": "assistant", "content": "x"}], add_generation_prompt=False)
    with pytest.raises(TemplateError):
        render_chat_template("{% for %}", [], add_generation_prompt=False)
    with pytest.raises(TemplateError):  # no escape from the sandbox
        render_chat_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", [], add_generation_prompt=False)
    with pytest.raises(TemplateError):  # no mutation of the data
        render_chat_template("{{ messages.append(1) }}", [], add_generation_prompt=False)
    with pytest.raises(TemplateError):  # no namespace trickery
        render_chat_template("{% set ns = namespace() %}{% set ns._x = 1 %}", [], add_generation_prompt=False)


LIMITS = TemplateLimits(max_chars=100_000, max_output_chars=100_000, timeout_s=0.5)

HOSTILE = [
    "{{ 'a' * 100000000 }}",
    "{{ ['a'] * 100000000 }}",
    "{{ 10 ** 100000000 }}",
    "{% set ns = namespace(x=7) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s.replace('a', 'aa') %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s | replace('a', 'aa') %}{% endfor %}",
    "{% set s = 'x' * 50000 %}{{ s.join([s, s, s]) }}",
    "{% set s = 'x\n' * 25000 %}{{ s | indent('y' * 50000) }}",
    "{% set s = 'x\n' * 40000 %}{{ s | indent(100000) }}",
    "{% set s = 'x' * 90000 %}{{ [s, s, s] }}",
    "{% set s = 'x' * 90000 %}{{ [s, s, s] | tojson }}",
    "{% set s = 'x' * 90000 %}{{ [s, s, s] | join(',') }}",
    "{% set s = 'x' * 90000 %}{{ (s, s) | string }}",
    "{% set s = 'x' * 90000 %}{{ '%s%s' % (s, s) }}",
    "{% set s = 'x' * 90000 %}{{ '{}{}'.format(s, s) }}",
    "{{ 'x' | center(1000000000) }}",
    "{{ 'x'.ljust(1000000000) }}",
    "{{ '%1000000000d' % 1 }}",
    "{{ '{:>1000000000}'.format(1) }}",
    "{{ '{x:>1000000000}'.format_map({'x': 1}) }}",
    "{{ '\t' * 1000 | wordwrap(1, wrapstring='y' * 90000) }}",
    "{% for i in range(10000000) %}x{% endfor %}",
    "{% for i in range(90000) %}{% for j in range(90000) %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% for i in range(90000) %}{{ 'abcdefgh' * 1000 }}{% endfor %}",
    "{% set s = 'x' * 90000 %}{% set c %}{% for i in range(1000) %}{{ s }}{% endfor %}{% endset %}{{ c | length }}",
    "{% set s = 'x' * 90000 %}{% macro m() %}{% for i in range(1000) %}{{ s }}{% endfor %}{% endmacro %}{{ m() | length }}",
    "{% set s = 'x' * 90000 %}{% filter upper %}{% for i in range(1000) %}{{ s }}{% endfor %}{% endfilter %}",
    "{{ 'x'.expandtabs(100000) }}",
    "{{ 'x'.translate({120: 'y' * 90000}) }}",
    "{{ lipsum(100000, max=100000) }}",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_templates_stop_small_and_fast(template: str) -> None:
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(TemplateError):
            render_chat_template(template, [{"role": "user", "content": "hi"}], add_generation_prompt=True, limits=LIMITS)
        elapsed = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 5.0, elapsed  # a 0.5 s deadline; tracemalloc slows the render
    assert peak < 16 << 20, f"{peak >> 20} MiB"  # values are capped at 100,000 characters


def test_the_deadline_stops_a_busy_template() -> None:
    limits = TemplateLimits(max_chars=100_000, timeout_s=0.2, work_factor=10**6)
    busy = "{% for i in range(90000) %}{% for j in range(90000) %}{{ '' }}{% endfor %}{% endfor %}"
    t0 = time.monotonic()
    with pytest.raises(TemplateLimitError, match="longer than 0.2 s"):
        render_chat_template(busy, [], add_generation_prompt=False, limits=limits)
    assert time.monotonic() - t0 < 2.0


def test_work_within_the_limits_renders() -> None:
    messages = [{"role": "user", "content": "x" * 40_000}, {"role": "assistant", "content": "y" * 40_000}]
    out = render_chat_template(CHATML_TOOLS, messages, add_generation_prompt=True, limits=LIMITS)
    assert len(out) > 80_000
    with pytest.raises(TemplateLimitError):  # the same over the output limit
        render_chat_template(CHATML_TOOLS, messages * 2, add_generation_prompt=True, limits=LIMITS)


def test_budgets_are_per_render_across_threads() -> None:
    """A hostile render on one thread does not spend the budget of a normal one on another."""
    limits = TemplateLimits(max_chars=100_000, timeout_s=0.5)
    busy = "{% for i in range(90000) %}{% for j in range(90000) %}{% endfor %}{% endfor %}"

    def normal() -> str:
        return render_chat_template(CHATML_TOOLS, CONVERSATIONS[1], add_generation_prompt=True, limits=limits)

    def hostile() -> str:
        return render_chat_template(busy, [], add_generation_prompt=False, limits=limits)

    with ThreadPoolExecutor(4) as pool:
        bad = [pool.submit(hostile) for _ in range(2)]
        good = [pool.submit(normal) for _ in range(20)]
        assert all(f.result().endswith("<|im_start|>assistant\n") for f in good)
        for f in bad:
            with pytest.raises(TemplateLimitError):
                f.result()
