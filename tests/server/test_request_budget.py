"""``--max-tokens-per-request``: a request whose n x max_tokens exceeds it is a 400 in OpenAI's error shape."""

from __future__ import annotations

from pathlib import Path

from tests.server.helpers import MAX_BODY_BYTES, MODEL_NAME, assert_error_shape


def test_n_times_max_tokens_over_the_budget_is_a_400(server_model_dir: Path) -> None:
    from starlette.testclient import TestClient

    from tokenmill.engine import Engine, EngineConfig
    from tokenmill.server.app import build_state, create_app
    from tokenmill.server.state import ServerSettings

    engine = Engine(EngineConfig(model=str(server_model_dir), kv_cache_memory=4 << 20, max_model_len=64,
                                 max_tokens_per_request=40))  # fmt: skip
    state = build_state(engine, ServerSettings(served_model_names=[MODEL_NAME], max_body_bytes=MAX_BODY_BYTES))
    with TestClient(create_app(state)) as client:
        ok = client.post("/v1/completions", json={"prompt": "hi", "n": 2, "max_tokens": 20, "ignore_eos": True})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
        err = assert_error_shape(
            client.post("/v1/completions", json={"prompt": "hi", "n": 3, "max_tokens": 20}), 400,
            type="invalid_request_error",
        )  # fmt: skip
        assert "max_tokens_per_request" in err["message"]
        # without max_tokens a request asks for the rest of the context
        assert_error_shape(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}), 400)
    assert engine.scheduler.kv.pool.num_used == 0
