"""Per-request KV eviction in the OpenAI API: ``kv_eviction`` / ``kv_budget`` / ``kv_sinks`` / ``kv_recent``
(extra body) override the server's ``--kv-eviction``; bad combinations are 400s naming the parameter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.server.helpers import MAX_BODY_BYTES, MODEL_NAME, assert_error_shape
from tokenmill.core.kv_eviction import KVEviction


def test_requests_choose_their_kv_eviction_and_bad_ones_are_400s(server_model_dir: Path) -> None:
    from starlette.testclient import TestClient

    from tokenmill.engine import Engine, EngineConfig
    from tokenmill.server.app import build_state, create_app
    from tokenmill.server.state import ServerSettings

    engine = Engine(EngineConfig(model=str(server_model_dir), kv_cache_memory=4 << 20, max_model_len=128,
                                 block_size=4, kv_eviction=KVEviction("streaming", 16, sinks=2)))  # fmt: skip
    seen: list[Any] = []
    add = engine.scheduler.add_request

    def spy(req: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(req.kv_eviction)
        return add(req, *args, **kwargs)

    engine.scheduler.add_request = spy  # type: ignore[method-assign]
    state = build_state(engine, ServerSettings(served_model_names=[MODEL_NAME], max_body_bytes=MAX_BODY_BYTES))
    body = {"prompt": "hello there", "max_tokens": 40, "ignore_eos": True}
    with TestClient(create_app(state)) as client:
        for extra, want in [
            ({}, KVEviction("streaming", 16, sinks=2)),  # the server's default
            ({"kv_eviction": "none"}, None),
            ({"kv_budget": 24}, KVEviction("streaming", 24, sinks=2)),
            ({"kv_eviction": "h2o", "kv_budget": 20, "kv_sinks": 1, "kv_recent": 8}, KVEviction("h2o", 20, 1, 8)),
        ]:
            seen.clear()
            r = client.post("/v1/completions", json={**body, **extra})
            assert r.status_code == 200, r.text
            assert len(r.json()["choices"][0]["text"]) > 0 and r.json()["usage"]["completion_tokens"] == 40
            assert seen == [want]
        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                         "max_tokens": 30, "kv_eviction": "h2o"})  # fmt: skip
        assert chat.status_code == 200, chat.text
        for extra, param in [
            ({"kv_eviction": "lru"}, "kv_eviction"),
            ({"kv_budget": 0}, "kv_budget"),
            ({"kv_budget": 8, "kv_recent": 8}, "kv_budget"),  # 2 sinks + 8 recent > 8
        ]:
            err = assert_error_shape(client.post("/v1/completions", json={**body, **extra}), 400,
                                     type="invalid_request_error")  # fmt: skip
            assert param in (err.get("param") or "") + err["message"], err
    assert engine.scheduler.kv.pool.num_used == 0


def test_without_a_server_default_a_budget_is_needed() -> None:
    import pytest

    from tokenmill.server.errors import APIError
    from tokenmill.server.params import kv_eviction
    from tokenmill.server.protocol import CompletionRequest

    def body(**kw: Any) -> CompletionRequest:
        return CompletionRequest(prompt="x", **kw)

    with pytest.raises(APIError, match="kv_eviction needs kv_budget"):
        kv_eviction(body(kv_eviction="h2o"), None)
    with pytest.raises(APIError, match="need kv_eviction"):
        kv_eviction(body(kv_budget=64), None)
    assert kv_eviction(body(kv_eviction="streaming", kv_budget=64), None) == KVEviction("streaming", 64)
    assert kv_eviction(body(kv_eviction="none"), KVEviction("h2o", 64)) is None
