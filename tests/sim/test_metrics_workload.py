"""Metrics (histogram quantiles, summaries) and workload sources (JSONL, Azure, mixes, prompts)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tokenmill.sim import workload as W
from tokenmill.sim.metrics import LogHistogram, RequestRecords, summarize


def test_log_histogram_quantiles_within_resolution() -> None:
    rng = np.random.default_rng(0)
    x = rng.lognormal(-4, 1, 50000)
    h = LogHistogram()
    for v in x[:25000]:
        h.add(float(v))
    h.add(0.0, 10)
    for v in x[25000:]:
        h.add(float(v), 1)
    assert h.total == 50010
    assert h.mean == pytest.approx(x.sum() / 50010, rel=1e-9)
    xs = np.concatenate([x, np.zeros(10)])
    for q in (0.5, 0.9, 0.99):
        assert h.quantile(q) == pytest.approx(np.quantile(xs, q), rel=0.01)
    assert h.quantile(0.0001) == 0.0
    assert math.isnan(LogHistogram().quantile(0.5))


def test_summary_numbers() -> None:
    rec = RequestRecords()
    for i in range(10):
        rec.index.append(i)
        rec.arrival.append(float(i))
        rec.first_token.append(i + 0.1 * (i + 1))
        rec.finish.append(i + 0.1 * (i + 1) + 0.02 * 9)
        rec.prompt_len.append(100)
        rec.output_len.append(10)
        rec.ttft_slo.append(0.5)
        rec.tpot_slo.append(float("nan"))
        rec.client.append("")
        rec.slo_class.append("")
        rec.preemptions.append(0)
        rec.cached_tokens.append(0)
    h = LogHistogram()
    h.add(0.02, 90)
    s = summarize(rec, h)
    assert s["completed"] == 10
    assert s["ttft_ms"]["mean"] == pytest.approx(550.0)
    assert s["tpot_ms"]["p50"] == pytest.approx(20.0)
    assert s["slo_attainment"] == pytest.approx(0.5)  # TTFT 0.1 .. 1.0 s against 0.5 s
    assert s["total_output_tokens"] == 100
    assert summarize(rec, h, ttft_slo=2.0)["slo_attainment"] == 1.0


def test_jsonl_roundtrip_and_validation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    wl = W.synthetic(50, 5.0, "uniform:5,50", "exp:20", shared_prefix_groups=2, shared_prefix_len=16,
                     vocab_size=500, seed=1, slo_class="standard")  # fmt: skip
    for i, r in enumerate(wl.requests[:5]):
        r.prompt_tokens = wl.prompt_tokens(i, r)
    p = tmp_path / "t.jsonl"
    wl.to_jsonl(p)
    back = W.from_jsonl(p, vocab_size=500)
    assert [(r.prompt_len, r.output_len, r.slo_class, r.ttft_slo) for r in back.requests] == \
        [(r.prompt_len, r.output_len, r.slo_class, r.ttft_slo) for r in wl.requests]  # fmt: skip
    assert back.requests[0].arrival == 0.0
    assert back.requests[3].prompt_tokens == wl.requests[3].prompt_tokens
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"arrival": 0, "prompt_tokens": [1, 999], "output_len": 3}) + "\n")
    with pytest.raises(ValueError, match="outside"):
        W.from_jsonl(bad, vocab_size=500)
    bad.write_text(json.dumps({"arrival": 0, "output_len": 3}) + "\n")
    with pytest.raises(ValueError, match="bad trace line"):
        W.from_jsonl(bad)


def test_synthetic_prompts_share_exactly_their_prefix() -> None:
    wl = W.synthetic(200, 5.0, "fixed:40", "fixed:5", shared_prefix_groups=3, shared_prefix_len=32,
                     vocab_size=50, seed=2)  # fmt: skip
    prompts = [wl.prompt_tokens(i, r) for i, r in enumerate(wl.requests)]
    assert all(len(p) == 72 and all(0 <= t < 50 for t in p) for p in prompts)
    by_group: dict[int, list[list[int]]] = {}
    for r, p in zip(wl.requests, prompts, strict=True):
        by_group.setdefault(r.prefix_group, []).append(p)
    for g, ps in by_group.items():
        assert all(p[:32] == wl.prefixes[g] for p in ps)
    # Past the shared prefix, no two prompts agree on their first block of 16.
    assert len({tuple(p[32:48]) for p in prompts}) == len(prompts)


def test_azure_trace_replay_and_resampling() -> None:
    wl = W.from_azure_csv(num_requests=500)
    assert len(wl) == 500 and wl.requests[0].arrival == 0.0
    assert 3 < 500 / wl.duration < 10  # the conversation trace runs at about 5.5 req/s
    fast = W.from_azure_csv(num_requests=500, time_scale=0.5)
    assert fast.duration == pytest.approx(wl.duration / 2)
    late = W.from_azure_csv(num_requests=10, start=600.0)
    assert late.requests[0].arrival < 5
    rs = W.from_azure_csv(num_requests=2000, arrival="poisson", rate=50.0, seed=3)
    assert 2000 / rs.duration == pytest.approx(50.0, rel=0.1)
    assert "CC-BY" in rs.description["attribution"]
    assert rs.clip(4096) > 0 and all(r.prompt_len + r.output_len <= 4096 for r in rs.requests)


def test_mix_tenants_rates_and_classes() -> None:
    mix = {"num_requests": 600, "slo_classes": {"gold": {"ttft": 0.2, "tpot": 0.02}}, "tenants": [
        {"name": "a", "rate": 2.0, "slo": "gold", "shared_prefix": {"groups": 2, "length": 64}},
        {"name": "b", "rate": 1.0, "arrival": "gamma:2.0", "slo": {"ttft": 5, "tpot": 0.5}},
    ]}  # fmt: skip
    wl = W.from_mix(mix, seed=0)
    clients = [r.client for r in wl.requests]
    assert clients.count("a") == 400 and clients.count("b") == 200
    assert {r.ttft_slo for r in wl.requests if r.client == "a"} == {0.2}
    assert all(r.prefix_group >= 0 for r in wl.requests if r.client == "a")
    with pytest.raises(ValueError, match="unknown SLO class"):
        W.from_mix({"tenants": [{"rate": 1, "slo": "platinum"}]})
