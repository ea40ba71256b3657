"""The published OpenAPI schema is true, and a schemathesis run keeps it so.

Handlers return plain dicts (building the response models per request would
cost time on the hot path); the schema declares the models, and here every
body a real server sends, for schema-valid and schema-invalid requests, is
checked against it: no 5xx, only declared status codes and content types,
bodies that validate.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server.helpers import InProcessServer, make_app


@pytest.fixture(scope="module")
def live(server_model_dir: Path) -> Iterator[InProcessServer]:
    # A short context: no request the fuzzer writes can generate for long.
    app, state = make_app(server_model_dir, max_model_len=32, kv_cache_memory=4 << 20)
    with InProcessServer(app, state) as srv:
        yield srv


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def test_schema_declares_the_real_bodies(live: InProcessServer) -> None:
    import httpx

    schema = httpx.get(f"{live.base_url}/openapi.json", timeout=10).json()
    paths = schema["paths"]

    def ok(path: str, method: str) -> dict[str, Any]:
        return paths[path][method]["responses"]["200"]["content"]

    assert ok("/health", "get") == {"application/json": {"schema": _ref("HealthResponse")}}
    assert ok("/v1/models", "get") == {"application/json": {"schema": _ref("ModelList")}}
    assert ok("/metrics", "get") == {"text/plain": {"schema": {"type": "string"}}}
    for path, model, chunk in (
        ("/v1/completions", "CompletionResponse", "CompletionResponse"),
        ("/v1/chat/completions", "ChatCompletionResponse", "ChatCompletionChunk"),
    ):
        content = ok(path, "post")
        assert content["application/json"] == {"schema": _ref(model)}
        data = content["text/event-stream"]["itemSchema"]["properties"]["data"]["oneOf"]
        assert data[0] == {"const": "[DONE]"}
        assert data[1]["contentSchema"] == {"anyOf": [_ref(chunk), _ref("ErrorResponse")]}
        assert chunk in schema["components"]["schemas"]
        responses = paths[path]["post"]["responses"]
        assert "422" not in responses  # schema errors are 400 here, as OpenAI answers them
        for status in ("400", "401", "404", "413", "429", "503"):
            assert responses[status]["content"]["application/json"]["schema"] == _ref("ErrorResponse")
    assert "HTTPValidationError" not in schema["components"]["schemas"]


def test_real_bodies_validate_against_the_models(live: InProcessServer) -> None:
    import json

    import httpx

    from tokenmill.server.protocol import (
        ChatCompletionChunk,
        ChatCompletionResponse,
        CompletionResponse,
        ErrorResponse,
        HealthResponse,
        ModelList,
    )

    url = live.base_url
    HealthResponse.model_validate(httpx.get(f"{url}/health").json())
    ModelList.model_validate(httpx.get(f"{url}/v1/models").json())
    body = {"prompt": ["one", "two"], "max_tokens": 4, "n": 2, "logprobs": 2, "echo": False}
    CompletionResponse.model_validate(httpx.post(f"{url}/v1/completions", json=body, timeout=30).json())
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logprobs": True, "top_logprobs": 2}
    ChatCompletionResponse.model_validate(httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=30).json())
    ErrorResponse.model_validate(httpx.post(f"{url}/v1/completions", json={"prompt": 3}, timeout=30).json())
    for path, payload, model in (
        ("/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}, CompletionResponse),
        ("/v1/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": True}}, ChatCompletionChunk),
    ):
        resp = httpx.post(f"{url}{path}", json=payload, timeout=30)
        events = [e[6:] for e in resp.text.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            model.model_validate(json.loads(event))


def _short(case: Any) -> Any:
    """Keep valid requests cheap: at most 2 samples of at most 4 tokens (both stay within the schema)."""
    body = case.body
    if isinstance(body, dict):
        if isinstance(body.get("n"), int) and not isinstance(body["n"], bool):
            body["n"] = min(body["n"], 2)
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 4):
                body[key] = 4
    return case


def test_schemathesis_finds_the_schema_true(live: InProcessServer) -> None:
    import httpx
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_dict(httpx.get(f"{live.base_url}/openapi.json", timeout=10).json())
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        negative_data_rejection,
    ]
    ran: dict[str, int] = {}
    statuses: dict[str, set[int]] = {}

    def check(operation: Any, mode: Any, max_examples: int) -> None:
        key = f"{operation.label} {mode.value}"

        strategy = operation.as_strategy(generation_mode=mode)
        if mode is schemathesis.GenerationMode.POSITIVE:
            strategy = strategy.map(_short)  # a shortened invalid body could become valid

        @settings(
            max_examples=max_examples,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def run(case: Any) -> None:
            response = case.call_and_validate(base_url=live.base_url, checks=checks, timeout=30)
            ran[key] = ran.get(key, 0) + 1
            statuses.setdefault(key, set()).add(response.status_code)

        run()

    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.body:
            check(operation, schemathesis.GenerationMode.POSITIVE, 25)
            check(operation, schemathesis.GenerationMode.NEGATIVE, 25)
        else:  # a GET without parameters has one request, and no invalid one
            check(operation, schemathesis.GenerationMode.POSITIVE, 3)
    assert {k.split(" ")[1] for k in ran} >= {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}
    assert sum(ran.values()) >= 80, ran
    # valid requests were served (not only refused), invalid ones refused
    assert 200 in statuses["POST /v1/completions positive"], statuses
    assert 200 in statuses["POST /v1/chat/completions positive"], statuses
    assert statuses["POST /v1/completions negative"] <= {400, 413}, statuses
