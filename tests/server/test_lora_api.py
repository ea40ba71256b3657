"""LoRA adapters over the OpenAI API: served as models, loaded and unloaded at runtime (vLLM's
endpoints), and every bad adapter a clear 400 naming it while the server keeps serving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.helpers import (
    MAX_BODY_BYTES,
    MODEL_NAME,
    InProcessServer,
    assert_error_shape,
    engine_idle,
    wait_until,
)
from tokenmill.lora.testing import write_random_adapter


@pytest.fixture(scope="module")
def adapters(server_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("server-adapters")
    wide = root / "wide-base"
    wide.mkdir()
    cfg = json.loads((server_model_dir / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**cfg, "hidden_size": 96, "intermediate_size": 160}))
    broken = root / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    return {
        "attn": write_random_adapter(root / "attn", server_model_dir, rank=4, targets=("q_proj", "v_proj"), seed=1, std=0.3),
        "mlp": write_random_adapter(root / "mlp", server_model_dir, rank=8, targets=("gate_proj", "down_proj"), seed=2, std=0.3),
        "rank32": write_random_adapter(root / "rank32", server_model_dir, rank=32, seed=3),
        "wide": write_random_adapter(root / "wide", wide, rank=4, seed=4),
        "broken": broken,
    }


def make_app(model_dir: Path, loras: dict[str, Path], **settings: Any) -> tuple[Any, Any]:
    from tokenmill.engine import Engine, EngineConfig
    from tokenmill.server.app import build_state, create_app
    from tokenmill.server.state import ServerSettings

    engine = Engine(EngineConfig(model=str(model_dir), kv_cache_memory=4 << 20, max_model_len=64, max_num_seqs=16,
                                 max_loras=2, max_lora_rank=16))  # fmt: skip
    for name, path in loras.items():
        engine.add_lora(name, str(path))
    state = build_state(engine, ServerSettings(served_model_names=[MODEL_NAME], max_body_bytes=MAX_BODY_BYTES, **settings))
    return create_app(state), state


def complete(c: httpx.Client, model: str, prompt: str = "In the beginning") -> httpx.Response:
    return c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0})


def test_adapters_as_models_and_runtime_updates(server_model_dir: Path, adapters: dict[str, Path]) -> None:
    app, state = make_app(server_model_dir, {"attn": adapters["attn"]}, enable_lora_runtime_updates=True)
    with InProcessServer(app, state) as srv, httpx.Client(base_url=srv.base_url, timeout=60) as c:
        cards = c.get("/v1/models").json()["data"]
        assert [(m["id"], m.get("parent")) for m in cards] == [(MODEL_NAME, None), ("attn", MODEL_NAME)]

        base, attn = complete(c, MODEL_NAME), complete(c, "attn")
        assert base.status_code == attn.status_code == 200, attn.text
        assert attn.json()["model"] == "attn"
        assert attn.json()["choices"][0]["text"] != base.json()["choices"][0]["text"]
        chat = c.post("/v1/chat/completions", json={"model": "attn", "stream": True, "max_tokens": 4,
                                                    "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert chat.status_code == 200 and "data: [DONE]" in chat.text and '"model":"attn"' in chat.text.replace(" ", "")

        err = assert_error_shape(complete(c, "nope"), 404, type="not_found_error", code="model_not_found")
        assert "'nope'" in err["message"]

        ok = c.post("/v1/load_lora_adapter", json={"lora_name": "mlp", "lora_path": str(adapters["mlp"])})
        assert ok.status_code == 200 and ok.text == "Success: LoRA adapter 'mlp' added successfully."
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [MODEL_NAME, "attn", "mlp"]
        mlp = complete(c, "mlp")
        assert mlp.status_code == 200 and mlp.json()["choices"][0]["text"] not in (
            base.json()["choices"][0]["text"], attn.json()["choices"][0]["text"])

        bad = {
            "attn": (adapters["mlp"], "has already been loaded"),
            MODEL_NAME: (adapters["mlp"], "the base model's name"),
            "missing": (adapters["mlp"].parent / "nowhere", "'missing'.* is not a directory"),
            "rank32": (adapters["rank32"], "'rank32'.* rank 32, over the maximum LoRA rank 16"),
            "wide": (adapters["wide"], "'wide'.* made for a different base model"),
            "broken": (adapters["broken"], "'broken'.* not valid JSON"),
        }
        import re

        for name, (path, message) in bad.items():
            resp = c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
            err = assert_error_shape(resp, 400, type="invalid_request_error")
            assert re.search(message, err["message"]), err
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [MODEL_NAME, "attn", "mlp"]

        gone = c.post("/v1/unload_lora_adapter", json={"lora_name": "mlp"})
        assert gone.status_code == 200 and gone.text == "Success: LoRA adapter 'mlp' removed successfully."
        assert_error_shape(complete(c, "mlp"), 404, code="model_not_found")
        assert_error_shape(c.post("/v1/unload_lora_adapter", json={"lora_name": "mlp"}), 404, code="model_not_found")
        assert_error_shape(c.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 400)  # no path

        # still serving, the same answers, and nothing held
        assert complete(c, "attn").json()["choices"] == attn.json()["choices"]
        assert complete(c, MODEL_NAME).json()["choices"] == base.json()["choices"]
        wait_until(lambda: engine_idle(state), what="idle")


def test_runtime_updates_are_off_by_default(server_model_dir: Path, adapters: dict[str, Path]) -> None:
    app, state = make_app(server_model_dir, {})
    with InProcessServer(app, state) as srv, httpx.Client(base_url=srv.base_url, timeout=60) as c:
        resp = c.post("/v1/load_lora_adapter", json={"lora_name": "attn", "lora_path": str(adapters["attn"])})
        assert_error_shape(resp, 404)
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [MODEL_NAME]
        assert "/v1/load_lora_adapter" not in c.get("/openapi.json").json()["paths"]
