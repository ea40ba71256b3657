"""``/metrics``: the prefix-cache counters stay at zero with the cache off; the TPOT histogram (vLLM's
``time_per_output_token``: (e2e - TTFT) / (output tokens - 1), one observation per finished sample)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.helpers import MODEL_NAME, metric, parse_metrics
from tokenmill.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tokenmill.server.metrics import ServerMetrics

TPOT = "tokenmill_time_per_output_token_seconds"


def _out(rid: str, deltas: list[list[int]], reasons: list[str | None], finished: bool = False) -> RequestOutput:
    samples = [CompletionOutput(index=i, delta_token_ids=d, finish_reason=r)
               for i, (d, r) in enumerate(zip(deltas, reasons, strict=True))]  # fmt: skip
    return RequestOutput(rid, None, [1, 2, 3], samples, finished=finished, metrics=RequestMetrics(arrival_time=0.0))


def test_tpot_is_observed_once_per_finished_sample() -> None:
    m = ServerMetrics("m")
    m.on_added("r", 0.0, 3)
    # Two samples: sample 0 gets its first token at 1.0 and 4 more by 3.0 (TPOT 0.5);
    # sample 1 gets 1 token at 1.0, then 2 at once at 2.0 (a multi-step plan), and
    # finishes there (TPOT 0.5). A one-token sample has no TPOT.
    m.on_output(_out("r", [[5], [6]], [None, None]), 1.0)
    m.on_output(_out("r", [[5, 5], [6, 6]], [None, "length"]), 2.0)
    m.on_output(_out("r", [[5, 5], []], ["stop", "length"], finished=True), 3.0)
    m.on_added("s", 0.0, 3)
    m.on_output(_out("s", [[7]], ["length"], finished=True), 0.5)
    page = parse_metrics(m.render().decode())
    assert page[f"{TPOT}_count"] == 2
    assert page[f"{TPOT}_sum"] == pytest.approx(1.0)
    assert metric(page, f"{TPOT}_bucket", le="0.5") == 2 and metric(page, f"{TPOT}_bucket", le="0.3") == 0


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_prefix_cache_counters_follow_the_cache(server_model_dir: Path, prefix_caching: bool) -> None:
    from starlette.testclient import TestClient

    from tokenmill.engine import Engine, EngineConfig
    from tokenmill.server.app import build_state, create_app
    from tokenmill.server.state import ServerSettings

    engine = Engine(EngineConfig(model=str(server_model_dir), kv_cache_memory=1 << 20, max_model_len=128,
                                 enable_prefix_caching=prefix_caching))  # fmt: skip
    state = build_state(engine, ServerSettings(served_model_names=[MODEL_NAME]))
    prompt = "And it said, let there be blocks: and there were blocks. " * 3
    with TestClient(create_app(state)) as client:
        for _ in range(2):
            body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 4, "temperature": 0}
            assert client.post("/v1/completions", json=body).status_code == 200
        page = parse_metrics(client.get("/metrics").text)
    queries, hits = page["tokenmill_prefix_cache_queries_total"], page["tokenmill_prefix_cache_hits_total"]
    if prefix_caching:
        assert queries > 0 and hits > 0  # the second request reuses the first one's blocks
    else:
        assert queries == 0 and hits == 0
    # Both requests generated 4 tokens: one TPOT observation each.
    assert page[f"{TPOT}_count"] == 2
