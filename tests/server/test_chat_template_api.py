"""Chat templates at the API.

A template sent in the request is refused unless the server was started
with ``--trust-request-chat-template``; every template (the model's too)
renders inside limits, so a hostile one is a 400, not a hang or an OOM;
``tool`` and ``developer`` messages render with the bundled model's template,
and a model template that refuses a message is a clear 400.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.helpers import MODEL_NAME, ServerProcess, assert_error_shape, make_app

MESSAGES = [{"role": "user", "content": "hello there"}]
# Renders the first message only: a request that uses it shows that the template ran.
ECHO_TEMPLATE = "{{ messages[0]['content'] }}"


def test_request_template_is_refused_without_trust(server: ServerProcess) -> None:
    url = f"{server.base_url}/v1/chat/completions"
    cases = [
        ({"chat_template": ECHO_TEMPLATE}, "chat_template"),
        ({"chat_template_kwargs": {"chat_template": ECHO_TEMPLATE}}, "chat_template_kwargs.chat_template"),
    ]
    for extra, param in cases:
        body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 1, **extra}
        resp = httpx.post(url, json=body, headers=server.headers, timeout=30.0)
        err = assert_error_shape(resp, 400, type="invalid_request_error", code="untrusted_chat_template")
        assert err["param"] == param
        assert "--trust-request-chat-template" in err["message"]
    # Other template variables stay allowed: they only feed the model's own template.
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 1, "chat_template_kwargs": {"enable_thinking": False}}
    assert httpx.post(url, json=body, headers=server.headers, timeout=30.0).status_code == 200


@pytest.fixture(scope="module")
def trusting(server_model_dir: Path) -> Iterator[tuple[Any, Any]]:
    from starlette.testclient import TestClient

    app, state = make_app(
        server_model_dir, settings={"trust_request_chat_template": True, "chat_template_timeout": 0.5}
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, state


def _chat(client: Any, **extra: Any) -> httpx.Response:
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 1, **extra}
    return client.post("/v1/chat/completions", json=body)


def test_trusted_request_template_renders(trusting: tuple[Any, Any]) -> None:
    client, state = trusting
    for extra in ({"chat_template": ECHO_TEMPLATE}, {"chat_template_kwargs": {"chat_template": ECHO_TEMPLATE}}):
        resp = _chat(client, **extra)
        assert resp.status_code == 200, resp.text
        expected = len(state.tokenizer("hello there", add_special_tokens=False)["input_ids"])
        assert resp.json()["usage"]["prompt_tokens"] == expected


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'a' * 100000000 }}",  # one huge string
        "{{ ['a'] * 100000000 }}",  # one huge list
        "{{ 10 ** 100000000 }}",  # one huge integer
        "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s.replace('a', 'aa') %}{% endfor %}{{ ns.s }}",
        "{{ 'x' | center(1000000000) }}",
        "{{ '%1000000000d' % 1 }}",
        "{{ '{:>1000000000}'.format(1) }}",
        "{% for i in range(10000000) %}x{% endfor %}",  # range too long
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",  # time
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",  # unbounded recursion
        "{% for i in range(50000) %}{{ 'abcdefgh' * 1000 }}{% endfor %}",  # output size
    ],
)
def test_hostile_templates_are_400_not_a_hang(trusting: tuple[Any, Any], template: str) -> None:
    client, state = trusting
    t0 = time.monotonic()
    resp = _chat(client, chat_template=template)
    elapsed = time.monotonic() - t0
    err = assert_error_shape(resp, 400, type="invalid_request_error")
    assert err["code"] in ("chat_template_limit", "context_length_exceeded"), err
    assert err["param"] == "chat_template", err
    assert elapsed < 30, elapsed  # the render timeout is 0.5 s; nothing may run unbounded
    # the server is still fine
    assert _chat(client).status_code == 200


def test_model_template_that_refuses_a_message_is_a_clear_400(server_model_dir: Path) -> None:
    from starlette.testclient import TestClient

    app, state = make_app(server_model_dir)
    state.tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('this model does not take tool messages') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    messages = [*MESSAGES, {"role": "tool", "content": "42", "tool_call_id": "call_1"}]
    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
        err = assert_error_shape(resp, 400, type="invalid_request_error", code="chat_template_error")
        assert err["param"] == "messages"
        assert "this model does not take tool messages" in err["message"]


TOOL_CONVERSATION = [
    {"role": "developer", "content": "Answer in verse."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees"},
]


def test_bundled_model_takes_tool_and_developer_messages() -> None:
    from starlette.testclient import TestClient

    app, state = make_app(None, kv_cache_memory=8 << 20, max_model_len=256)
    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.post("/v1/chat/completions", json={"messages": TOOL_CONVERSATION, "max_tokens": 2})
        assert resp.status_code == 200, resp.text
        # The tool result and the call are in the prompt, not dropped.
        only_user = client.post(
            "/v1/chat/completions", json={"messages": TOOL_CONVERSATION[1:2], "max_tokens": 2}
        ).json()
        assert resp.json()["usage"]["prompt_tokens"] > only_user["usage"]["prompt_tokens"] + 10
