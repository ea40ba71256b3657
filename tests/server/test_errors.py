"""Every error in OpenAI's shape, with the right status; and a fuzz run that finds no 5xx.

Status codes (see ``tokenmill/server/errors.py``): 400 for invalid JSON,
schema errors (wrong types, ranges, missing fields: pydantic's 422 is mapped
to 400, as OpenAI does), context overflow; 401 without the API key; 404 for
an unknown model or route; 405 for a wrong method; 413 for a body over the
limit; 429 with Retry-After for a full queue; 503 while draining.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.server.helpers import MAX_BODY_BYTES, MODEL_NAME, ServerProcess, assert_error_shape

# ------------------------------------------------------------ real server


def _post(server: ServerProcess, path: str, body: Any = None, *, content: Any = None, headers: dict[str, str] | None = None) -> httpx.Response:
    h = {**server.headers, **(headers or {})}
    if content is None:
        return httpx.post(f"{server.base_url}{path}", json=body, headers=h, timeout=30.0)
    return httpx.post(f"{server.base_url}{path}", content=content, headers={"Content-Type": "application/json", **h}, timeout=30.0)


def test_invalid_json(server: ServerProcess) -> None:
    resp = _post(server, "/v1/completions", content=b'{"prompt": "hi", ')
    assert_error_shape(resp, 400, type="invalid_request_error")


def test_body_not_an_object(server: ServerProcess) -> None:
    resp = _post(server, "/v1/chat/completions", content=b"[1, 2]")
    assert_error_shape(resp, 400, type="invalid_request_error")
    assert "JSON object" in resp.json()["error"]["message"]


def test_body_without_a_json_content_type(server: ServerProcess) -> None:
    for content in (b'{"prompt": "hi", ', b'{"prompt": "hi"}'):
        resp = httpx.post(
            f"{server.base_url}/v1/completions", content=content,
            headers={**server.headers, "Content-Type": "text/plain"}, timeout=30.0,
        )  # fmt: skip
        assert_error_shape(resp, 400, type="invalid_request_error")
        assert "Content-Type: application/json" in resp.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "hi", "temperature": 5}, "temperature"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "logprobs": 21}, "logprobs"),
        ({"prompt": "hi", "stop": ""}, None),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": "hi", "logit_bias": {"1": 5}}, "logit_bias"),
        ({"prompt": [1, 2, 10**6]}, "prompt"),
        ({"prompt": "hi", "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ],
)
def test_bad_completion_parameters(server: ServerProcess, body: dict[str, Any], param: str | None) -> None:
    err = assert_error_shape(_post(server, "/v1/completions", body), 400, type="invalid_request_error")
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param), err


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": "hi"},
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1},
        {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
    ],
)
def test_bad_chat_parameters(server: ServerProcess, body: dict[str, Any]) -> None:
    assert_error_shape(_post(server, "/v1/chat/completions", body), 400, type="invalid_request_error")


def test_unknown_model(server: ServerProcess) -> None:
    err = assert_error_shape(_post(server, "/v1/completions", {"model": "gpt-9", "prompt": "hi"}), 404, code="model_not_found")
    assert err["param"] == "model"
    body = {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}
    assert_error_shape(_post(server, "/v1/chat/completions", body), 404, code="model_not_found")


def test_context_length_exceeded(server: ServerProcess) -> None:
    # The tiny model's context is 256 tokens.
    err = assert_error_shape(
        _post(server, "/v1/completions", {"prompt": "hello", "max_tokens": 300}), 400, code="context_length_exceeded"
    )
    assert "256" in err["message"]
    assert_error_shape(
        _post(server, "/v1/completions", {"prompt": list(range(1, 257)), "max_tokens": 1}), 400, code="context_length_exceeded"
    )
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 400}
    assert_error_shape(_post(server, "/v1/chat/completions", chat), 400, code="context_length_exceeded")


def test_body_too_large(server: ServerProcess) -> None:
    big = json.dumps({"prompt": "x" * (MAX_BODY_BYTES + 10)}).encode()
    assert_error_shape(_post(server, "/v1/completions", content=big), 413, code="body_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies as the body arrives
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    assert_error_shape(_post(server, "/v1/completions", content=chunks()), 413, code="body_too_large")


def test_api_key_required(server: ServerProcess) -> None:
    body = {"prompt": "hi", "max_tokens": 1}
    resp = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=10.0)
    assert_error_shape(resp, 401, type="authentication_error", code="invalid_api_key")
    resp = httpx.post(f"{server.base_url}/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}, timeout=10.0)
    assert_error_shape(resp, 401, type="authentication_error")
    assert_error_shape(httpx.get(f"{server.base_url}/v1/models", timeout=10.0), 401)
    # Probes and scrapers need no key.
    assert httpx.get(f"{server.base_url}/health", timeout=10.0).status_code == 200
    assert httpx.get(f"{server.base_url}/metrics", timeout=10.0).status_code == 200


def test_unknown_route_and_wrong_method(server: ServerProcess) -> None:
    assert_error_shape(httpx.get(f"{server.base_url}/v1/nothing", headers=server.headers), 404)
    assert_error_shape(httpx.get(f"{server.base_url}/v1/completions", headers=server.headers), 405)


def test_openai_client_raises_typed_errors(openai_client: Any) -> None:
    import openai

    with pytest.raises(openai.NotFoundError):
        openai_client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=1000)
    assert info.value.code == "context_length_exceeded"


# ---------------------------------------------------------- in-process app


def _app(model_dir: Path, **engine_kw: Any) -> tuple[Any, Any]:
    from tokenmill.engine import Engine, EngineConfig
    from tokenmill.server.app import build_state, create_app
    from tokenmill.server.state import ServerSettings

    kw: dict[str, Any] = dict(model=str(model_dir), kv_cache_memory=4 << 20, max_model_len=64, max_num_seqs=16)
    engine = Engine(EngineConfig(**{**kw, **engine_kw}))
    state = build_state(engine, ServerSettings(served_model_names=[MODEL_NAME], max_body_bytes=MAX_BODY_BYTES))
    return create_app(state), state


def test_queue_full_is_429_with_retry_after(server_model_dir: Path) -> None:
    from starlette.testclient import TestClient

    app, state = _app(server_model_dir, max_num_seqs=1, max_waiting=1, max_decode_steps=1)
    engine = state.async_engine.engine
    real_step = engine.step

    def slow_step() -> Any:
        time.sleep(0.01)  # keep the first request running while the queue fills
        return real_step()

    engine.step = slow_step
    body = {"prompt": "hi", "max_tokens": 40, "ignore_eos": True}
    with TestClient(app, raise_server_exceptions=False) as client:
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(client.post("/v1/completions", json=body).status_code))]
        threads[0].start()
        _wait(lambda: state.async_engine.stats is not None and state.async_engine.stats.scheduler.num_running == 1)
        threads.append(threading.Thread(target=lambda: results.append(client.post("/v1/completions", json=body).status_code)))
        threads[1].start()
        _wait(lambda: state.async_engine.stats.scheduler.num_waiting == 1)
        resp = client.post("/v1/completions", json=body)
        assert_error_shape(resp, 429, type="rate_limit_error", code="queue_full")
        assert int(resp.headers["Retry-After"]) >= 1
        for t in threads:
            t.join(30)
        assert sorted(results) == [200, 200]


def test_engine_failure_is_503_not_a_hang(server_model_dir: Path) -> None:
    from starlette.testclient import TestClient

    app, state = _app(server_model_dir)

    def broken_step() -> Any:
        raise RuntimeError("simulated executor failure")

    state.async_engine.engine.step = broken_step
    body = {"prompt": "hi", "max_tokens": 2}
    with TestClient(app, raise_server_exceptions=False) as client:
        assert_error_shape(client.post("/v1/completions", json=body), 503, code="engine_unavailable")
        events = client.post("/v1/completions", json={**body, "stream": True})
        assert events.status_code == 503  # the engine is known dead before the stream starts
        assert_error_shape(client.get("/health"), 503, code="engine_unavailable")


def test_engine_failure_mid_stream_sends_an_error_event(server_model_dir: Path) -> None:
    from starlette.testclient import TestClient

    app, state = _app(server_model_dir, max_decode_steps=1)
    engine = state.async_engine.engine
    real_step, calls = engine.step, []

    def failing_step() -> Any:
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("simulated executor failure")
        return real_step()

    engine.step = failing_step
    # logprobs=0: every token makes a chunk, even one whose bytes do not yet decode to text
    body = {"prompt": "hi", "max_tokens": 20, "ignore_eos": True, "stream": True, "logprobs": 0}
    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.post("/v1/completions", json=body)
        assert resp.status_code == 200
        events = [e[6:] for e in resp.text.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["error"]["code"] == "engine_unavailable"
        assert any(json.loads(e).get("choices") for e in events[:-2])  # tokens came before the failure


def _wait(cond: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def fuzz_client(server_model_dir: Path) -> Iterator[tuple[Any, Any]]:
    from starlette.testclient import TestClient

    app, state = _app(server_model_dir)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, state


_any_text = st.text(st.characters(exclude_categories=()), max_size=12)  # surrogates and controls too
_scalar = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | _any_text
_json = st.recursive(_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(_any_text, c, max_size=3), max_leaves=6)
_small_int = st.integers(-3, 70)
_FIELDS: dict[str, Any] = {
    "model": st.sampled_from([MODEL_NAME, "other"]) | _any_text,
    "prompt": _any_text | st.lists(st.integers(-2, 400), max_size=6) | st.lists(_any_text, max_size=3)
    | st.lists(st.lists(st.integers(-2, 400), max_size=4), max_size=3),
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user", "assistant", "tool", "bogus"])},
            optional={"content": _any_text | st.none() | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _any_text}), max_size=2),
                      "name": _any_text},
        ),
        max_size=3,
    ),
    "max_tokens": st.none() | _small_int,
    "max_completion_tokens": st.none() | _small_int,
    "min_tokens": _small_int,
    "n": st.integers(-1, 3),
    "temperature": st.none() | st.floats(-1, 3),
    "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-3, 500),
    "min_p": st.floats(-0.5, 1.5),
    "repetition_penalty": st.floats(-1, 3),
    "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3),
    "seed": st.integers(-(2**65), 2**65),
    "stop": st.none() | _any_text | st.lists(_any_text, max_size=3),
    "stop_token_ids": st.lists(st.integers(-2, 500), max_size=3),
    "stream": st.booleans(),
    "stream_options": st.none() | st.fixed_dictionaries({}, optional={"include_usage": st.booleans(), "continuous_usage_stats": st.booleans()}),
    "logprobs": st.none() | st.booleans() | st.integers(-1, 22),
    "top_logprobs": st.none() | st.integers(-1, 22),
    "echo": st.booleans(),
    "ignore_eos": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "user": _any_text,
    "priority": st.integers(-(2**40), 2**40),
    "ttft_slo": st.floats(-1, 10),
    "logit_bias": st.dictionaries(_any_text, st.floats(-100, 100), max_size=2),
    "best_of": st.integers(-1, 3),
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
    "add_generation_prompt": st.booleans(),
    "continue_final_message": st.booleans(),
    "chat_template_kwargs": st.none() | st.dictionaries(_any_text, _scalar, max_size=2),
}
_VALID_COMMON: dict[str, Any] = {
    "model": st.just(MODEL_NAME),
    "max_tokens": st.integers(1, 12),
    "n": st.integers(1, 3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.05, 1),
    "top_k": st.integers(-1, 50),
    "seed": st.integers(0, 2**63 - 1),
    "stop": _any_text.filter(bool) | st.lists(_any_text.filter(bool), max_size=3),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
    "user": _any_text,
}
_valid_completion = st.fixed_dictionaries(
    {"prompt": _any_text.filter(bool) | st.lists(st.integers(0, 300), min_size=1, max_size=6)},
    optional={**_VALID_COMMON, "echo": st.booleans(), "logprobs": st.integers(0, 5)},
)
_valid_chat = st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": _any_text}), min_size=1, max_size=3)},
    optional={**_VALID_COMMON, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5)},
)


@st.composite
def _mutated(draw: Any, base: Any) -> Any:
    """A valid body with up to two fields replaced by plausible or arbitrary values."""
    body = dict(draw(base))
    for key in draw(st.lists(st.sampled_from(sorted(_FIELDS)), max_size=2)):
        body[key] = draw(_FIELDS[key] | _json)
    for key in draw(st.lists(st.sampled_from(sorted(body)), max_size=1)) if body else []:
        if draw(st.booleans()):
            del body[key]
    return body


# Mostly valid bodies with a few bad fields (these reach the engine), and some arbitrary JSON.
_body = _mutated(_valid_completion) | _mutated(_valid_chat) | _json


def _check_response(resp: Any) -> None:
    assert resp.status_code < 500, resp.text
    if resp.status_code != 200:
        body = resp.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    elif resp.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in resp.text.split("\n\n") if line]
        assert events[-1] == "data: [DONE]"
        for ev in events[:-1]:
            assert ev.startswith("data: ")
            json.loads(ev[6:])
    else:
        assert resp.json()["choices"] is not None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=_body, raw=st.none() | st.binary(max_size=40))
def test_fuzz_no_5xx(fuzz_client: tuple[Any, Any], path: str, body: Any, raw: bytes | None) -> None:
    client, _ = fuzz_client
    content = raw if raw is not None else json.dumps(body).encode()  # json.dumps writes NaN/Infinity too
    resp = client.post(path, content=content, headers={"Content-Type": "application/json"})
    event(f"status {resp.status_code}")
    _check_response(resp)


def test_fuzz_left_nothing_behind(fuzz_client: tuple[Any, Any]) -> None:
    """After the fuzz run no request is in flight and no KV block is owned."""
    _, state = fuzz_client
    engine = state.async_engine

    def idle() -> bool:
        stats = engine.stats
        return engine.num_in_flight == 0 and stats is not None and stats.scheduler.num_used_blocks == 0 \
            and stats.scheduler.num_running == 0 and stats.scheduler.num_waiting == 0

    try:
        _wait(idle)
    except AssertionError:
        raise AssertionError(f"not idle: in flight {list(engine._streams)}, stats {engine.stats}") from None
