"""A server that speculates: the same completions (plain and streamed) as one that does not, and
the speculative-decoding counters on ``/metrics``."""

from __future__ import annotations

import json
from pathlib import Path

from tests.server.helpers import MODEL_NAME, parse_metrics


def _client(model: Path, **spec):
    from starlette.testclient import TestClient

    from tokenmill.engine import Engine, EngineConfig
    from tokenmill.server.app import build_state, create_app
    from tokenmill.server.state import ServerSettings

    engine = Engine(EngineConfig(model=str(model), kv_cache_memory=1 << 20, max_model_len=128, **spec))
    return TestClient(create_app(build_state(engine, ServerSettings(served_model_names=[MODEL_NAME]))))


def test_speculating_server_answers_the_same_and_counts_drafts(server_model_dir: Path) -> None:
    prompt = "And it said, let there be blocks: and there were blocks. And it said"
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 24, "temperature": 0, "n": 2}
    with _client(server_model_dir) as plain:
        want = [c["text"] for c in plain.post("/v1/completions", json=body).json()["choices"]]
    with _client(server_model_dir, speculative="ngram", num_speculative_tokens=3) as client:
        got = [c["text"] for c in client.post("/v1/completions", json=body).json()["choices"]]
        streamed = ["", ""]
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for c in json.loads(line[6:])["choices"]:
                        streamed[c["index"]] += c["text"]
        page = parse_metrics(client.get("/metrics").text)
    assert got == want and streamed == want
    drafts = page["tokenmill_spec_decode_num_draft_tokens_total"]
    accepted = page["tokenmill_spec_decode_num_accepted_tokens_total"]
    assert drafts > 0 and page["tokenmill_spec_decode_num_drafts_total"] > 0
    assert page["tokenmill_spec_decode_acceptance_rate"] == accepted / drafts
    assert page["tokenmill_spec_decode_mean_accepted_length"] >= 1.0
    assert 0.0 <= page["tokenmill_spec_decode_draft_time_share"] < 1.0
