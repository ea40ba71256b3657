"""Bounds checked before the work: prompt size, prompts per request, what can ever fit; 429 at the door.

And work stops when the client goes: a non-streaming client that leaves
while its prompts are still being tokenized or added leaves nothing behind.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.helpers import (
    MODEL_NAME,
    InProcessServer,
    assert_error_shape,
    engine_idle,
    make_app,
    wait_until,
)


class SpyTokenizer:
    """The server's tokenizer, recording the length of every text it is asked to encode."""

    def __init__(self, tokenizer: Any, delay: float = 0.0) -> None:
        self._tok = tokenizer
        self.delay = delay
        self.lengths: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        texts = [text] if isinstance(text, str) else list(text)
        with self._lock:
            self.lengths.extend(len(t) for t in texts)
        if self.delay:
            time.sleep(self.delay * len(texts))
        return self._tok(text, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


@pytest.fixture(scope="module")
def spied(server_model_dir: Path) -> Any:
    from starlette.testclient import TestClient

    app, state = make_app(server_model_dir, max_waiting=64, settings={"max_body_bytes": 8 << 20})
    spy = SpyTokenizer(state.tokenizer)
    state.tokenizer = spy
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, state, spy


def test_long_text_is_refused_before_it_is_tokenized(spied: Any) -> None:
    client, state, spy = spied
    big = "In the beginning " * 250_000  # ~4 MB
    spy.lengths.clear()
    resp = client.post("/v1/completions", json={"prompt": big, "max_tokens": 1})
    err = assert_error_shape(resp, 400, code="context_length_exceeded")
    assert err["param"] == "prompt"
    resp = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": big}], "max_tokens": 1})
    err = assert_error_shape(resp, 400, code="context_length_exceeded")
    assert err["param"] == "messages"
    resp = client.post("/v1/completions", json={"prompt": ["short", big], "max_tokens": 1})
    err = assert_error_shape(resp, 400, code="context_length_exceeded")
    assert err["param"] == "prompt"
    assert all(n < 100_000 for n in spy.lengths), max(spy.lengths)
    # a prompt just over the token limit is still found by counting tokens
    resp = client.post("/v1/completions", json={"prompt": "the queue " * 40, "max_tokens": 1})
    assert_error_shape(resp, 400, code="context_length_exceeded")


def test_prompt_list_is_capped(spied: Any) -> None:
    client, state, spy = spied
    spy.lengths.clear()
    resp = client.post("/v1/completions", json={"prompt": ["hi"] * 20_000, "max_tokens": 1})
    err = assert_error_shape(resp, 400, type="invalid_request_error", code="too_many_prompts")
    assert err["param"] == "prompt"
    assert str(state.settings.max_prompts_per_request) in err["message"]
    resp = client.post("/v1/completions", json={"prompt": [[1, 2]] * 20_000, "max_tokens": 1})
    assert_error_shape(resp, 400, code="too_many_prompts")
    assert spy.lengths == []  # refused before any work


def test_prompt_list_cap_is_configurable(server_model_dir: Path) -> None:
    from starlette.testclient import TestClient

    app, _ = make_app(server_model_dir, settings={"max_prompts_per_request": 3})
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 1}).status_code == 200
        resp = client.post("/v1/completions", json={"prompt": ["a", "b", "c", "d"], "max_tokens": 1})
        assert_error_shape(resp, 400, code="too_many_prompts")


def test_token_ids_outside_the_vocabulary(spied: Any) -> None:
    client, state, _ = spied
    vocab = state.vocab_size
    for prompt in ([1, 2, vocab], [[1, 2], [3, vocab + 5]], [[1], [2**31 - 1]]):
        resp = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
        err = assert_error_shape(resp, 400, type="invalid_request_error")
        assert err["param"] is not None and err["param"].startswith("prompt"), err
        assert "vocabulary" in err["message"]
    resp = client.post("/v1/completions", json={"prompt": [1, 2, vocab - 1], "max_tokens": 1})
    assert resp.status_code == 200


def test_request_that_can_never_fit_is_400_not_429(server_model_dir: Path) -> None:
    from starlette.testclient import TestClient

    app, _ = make_app(server_model_dir, max_waiting=4)
    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.post("/v1/completions", json={"prompt": "hi", "n": 5, "max_tokens": 1})
        err = assert_error_shape(resp, 400, type="invalid_request_error", code="request_too_large")
        assert err["param"] == "n"
        resp = client.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 1})
        assert_error_shape(resp, 400, code="request_too_large")
        resp = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "n": 5})
        assert_error_shape(resp, 400, code="request_too_large")
        # what fits runs
        resp = client.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2, "max_tokens": 1})
        assert resp.status_code == 200, resp.text


def test_429_at_the_door_while_the_engine_thread_is_busy(server_model_dir: Path) -> None:
    """A full server answers 429 at once, without waiting for the engine thread."""
    app, state = make_app(server_model_dir, max_waiting=2, max_num_seqs=1)
    engine = state.async_engine.engine
    gate = threading.Event()
    real_step = engine.step

    def blocked_step() -> Any:
        gate.wait(60)  # the engine thread is stuck in a step
        return real_step()

    engine.step = blocked_step
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}
    results: list[int] = []
    with InProcessServer(app, state) as srv:
        def post() -> None:
            results.append(httpx.post(f"{srv.base_url}/v1/completions", json=body, timeout=60).status_code)

        threads = [threading.Thread(target=post) for _ in range(3)]  # 2 waiting + 1 running
        for t in threads:
            t.start()
        wait_until(lambda: state.async_engine.num_in_flight == 3, what="3 requests in flight")
        try:
            t0 = time.monotonic()
            resp = httpx.post(f"{srv.base_url}/v1/completions", json=body, timeout=5.0)
            elapsed = time.monotonic() - t0
        finally:
            gate.set()
        assert_error_shape(resp, 429, type="rate_limit_error", code="queue_full")
        assert int(resp.headers["Retry-After"]) >= 1
        assert elapsed < 5.0
        for t in threads:
            t.join(60)
        assert results == [200, 200, 200]
        wait_until(lambda: engine_idle(state), what="idle")


def test_client_that_leaves_during_tokenization_stops_the_work(server_model_dir: Path) -> None:
    app, state = make_app(server_model_dir, max_waiting=256)
    spy = SpyTokenizer(state.tokenizer, delay=0.05)
    state.tokenizer = spy
    prompts = [f"prompt number {i}" for i in range(64)]
    with InProcessServer(app, state) as srv:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{srv.base_url}/v1/completions", json={"prompt": prompts, "max_tokens": 50}, timeout=0.5)
        # 64 prompts take 3.2 s to tokenize: wait that long, so that work going on would show
        time.sleep(3.5)
        wait_until(lambda: engine_idle(state), what="idle")
        tokenized = len(spy.lengths)
        assert tokenized < 3 * len(prompts) // 4, tokenized
        assert state.async_engine.engine.num_steps == 0  # no prompt reached the engine
        # nothing is stuck: the server answers
        spy.delay = 0.0
        resp = httpx.post(f"{srv.base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=30)
        assert resp.status_code == 200


def test_client_that_leaves_while_prompts_are_added_leaves_nothing(server_model_dir: Path) -> None:
    app, state = make_app(server_model_dir, max_waiting=256)
    engine = state.async_engine.engine
    gate = threading.Event()
    real_step = engine.step

    def slow_step() -> Any:
        gate.wait(60)
        return real_step()

    engine.step = slow_step
    with InProcessServer(app, state) as srv:
        try:
            with pytest.raises(httpx.TimeoutException):
                body = {"prompt": [f"p{i}" for i in range(32)], "max_tokens": 50, "n": 2}
                httpx.post(f"{srv.base_url}/v1/completions", json=body, timeout=0.5)
        finally:
            gate.set()
        wait_until(lambda: engine_idle(state), what="idle")
        assert engine.scheduler.kv.pool.num_used == 0
        assert state.admission.num_reserved == 0 and state.async_engine.num_seqs_in_flight == 0
