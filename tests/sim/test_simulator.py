"""The event-driven simulator: completeness, multi-step equivalence, clusters, disaggregation, modes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tokenmill.core.scheduler import SchedulerConfig
from tokenmill.sim import workload as W
from tokenmill.sim.config import PoolConfig, SimConfig
from tokenmill.sim.cost_model import ConstantCostModel
from tokenmill.sim.hardware import get_hardware
from tokenmill.sim.model_spec import ModelShape
from tokenmill.sim.roofline import RooflineCostModel
from tokenmill.sim.simulator import simulate

ROOF = RooflineCostModel(ModelShape.load("llama-3-8b"), get_hardware("h100"))


def sched(**kw: object) -> SchedulerConfig:
    base = dict(num_blocks=2000, block_size=16, max_num_seqs=32, max_num_batched_tokens=1024, max_model_len=4096,
                max_decode_steps=256)  # fmt: skip
    base.update(kw)
    return SchedulerConfig(**base)  # type: ignore[arg-type]


def times_by_request(res) -> dict[int, tuple[float, float, int]]:  # type: ignore[no-untyped-def]
    r = res.records
    return {i: (f, e, n) for i, f, e, n in zip(r.index, r.first_token, r.finish, r.output_len, strict=True)}


def test_every_request_completes_with_its_output_length() -> None:
    wl = W.synthetic(300, 8.0, "lognormal:600,0.8", "lognormal:100,0.8", seed=1)
    res = simulate(wl, SimConfig(PoolConfig(sched(), ROOF)))
    s = res.summary
    assert s["completed"] == 300 and s["unfinished"] == 0 and s["rejected"] == 0
    want = {i: r.output_len for i, r in enumerate(wl.requests)}
    assert {i: n for i, (_, _, n) in times_by_request(res).items()} == want
    assert s["total_output_tokens"] == sum(want.values())
    assert 0 < s["ttft_ms"]["p50"] <= s["ttft_ms"]["p90"] <= s["ttft_ms"]["p99"]
    assert s["tpot_ms"]["mean"] == pytest.approx(s["itl_ms"]["mean"], rel=0.2)
    assert res.num_steps > 3 * res.num_plans, "decode runs should be jumped over in multi-step plans"
    assert res.series["t"] and max(res.series["kv_usage"]) > 0


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_multistep_planning_changes_no_timing(prefix_caching: bool) -> None:
    """Ideal mode plans many decode steps at once only as a shortcut: every token lands when single steps put it."""
    wl = W.synthetic(200, 60.0, "lognormal:300,0.8", "lognormal:80,0.8", shared_prefix_groups=3,
                     shared_prefix_len=64, seed=2)  # fmt: skip
    base = sched(num_blocks=250, enable_prefix_caching=prefix_caching)  # tight: preemptions happen
    one = simulate(wl, SimConfig(PoolConfig(dataclasses.replace(base, max_decode_steps=1), ROOF)))
    many = simulate(wl, SimConfig(PoolConfig(base, ROOF)))
    assert many.num_plans < one.num_plans  # overloaded: waiting requests often force single steps
    assert one.summary["preemptions"] > 0
    a, b = times_by_request(one), times_by_request(many)
    assert a.keys() == b.keys()
    for i in a:
        assert b[i][0] == pytest.approx(a[i][0], rel=1e-9, abs=1e-9)
        assert b[i][1] == pytest.approx(a[i][1], rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("router", ["round_robin", "least_outstanding_tokens", "prefix_aware"])
def test_cluster_multistep_equals_single_step(router: str) -> None:
    """With a router deciding at arrival time, arrivals cut in-flight plans; timings stay exact."""
    wl = W.synthetic(400, 40.0, "lognormal:400,0.8", "lognormal:100,0.8", seed=3)
    pool = PoolConfig(sched(enable_prefix_caching=False), ROOF, num_replicas=4, router=router)
    one = simulate(wl, SimConfig(dataclasses.replace(pool, scheduler=dataclasses.replace(pool.scheduler, max_decode_steps=1))))
    many = simulate(wl, SimConfig(pool))
    a, b = times_by_request(one), times_by_request(many)
    assert a.keys() == b.keys() and len(a) == 400
    for i in a:
        assert b[i][0] == pytest.approx(a[i][0], rel=1e-9, abs=1e-9)
        assert b[i][1] == pytest.approx(a[i][1], rel=1e-9, abs=1e-9)
    if router != "round_robin":
        assert sum(r["cut_plans"] for r in many.replicas) > 0


def test_prefix_aware_routing_raises_hit_rate() -> None:
    wl = W.synthetic(400, 40.0, "fixed:64", "fixed:16", shared_prefix_groups=40, shared_prefix_len=512, seed=4)

    def hit(router: str) -> float:
        res = simulate(wl, SimConfig(PoolConfig(sched(), ROOF, num_replicas=8, router=router)))
        return res.summary["prefix_cached_tokens"] / res.summary["total_input_tokens"]

    assert hit("prefix_aware") > hit("round_robin") + 0.2


def test_disaggregated_prefill_and_decode_pools() -> None:
    wl = W.synthetic(200, 10.0, "lognormal:800,0.6", "lognormal:60,0.6", seed=5)
    decode = PoolConfig(sched(), ROOF, num_replicas=2, router="least_outstanding_tokens")
    prefill = PoolConfig(sched(), ROOF, num_replicas=1, router="round_robin")
    kvb = ModelShape.load("llama-3-8b").kv_bytes_per_token(2)
    res = simulate(wl, SimConfig(decode, prefill_pool=prefill, kv_transfer_bandwidth=50e9, kv_bytes_per_token=kvb))
    s = res.summary
    assert s["completed"] == 200 and s["unfinished"] == 0
    assert s["kv_transfers"] == sum(1 for r in wl.requests if r.output_len > 1)
    assert s["kv_import_failures"] == 0
    assert s["num_gpus"] == 3
    roles = {r["role"] for r in res.replicas}
    assert roles == {"prefill", "decode"}
    # The decode pool computes no prompt token: the whole prompt's KV was imported, and
    # what moved is every block of every transferred prompt (no two prompts share one here).
    assert all(r["prefill_tokens"] == 0 for r in res.replicas if r["role"] == "decode")
    assert sum(r["prefill_tokens"] for r in res.replicas) == s["total_input_tokens"]
    moved = sum(-(-r.prompt_len // 16) for r in wl.requests if r.output_len > 1)
    assert s["kv_transfer_blocks"] == moved
    # A slower link shows up between the first and the second token.
    slow = simulate(wl, SimConfig(decode, prefill_pool=prefill, kv_transfer_bandwidth=1e9, kv_bytes_per_token=kvb))
    assert slow.summary["tpot_ms"]["mean"] > s["tpot_ms"]["mean"]
    assert slow.summary["ttft_ms"]["mean"] == pytest.approx(s["ttft_ms"]["mean"], rel=1e-6)


def test_engine_mode_delivers_tokens_when_plans_return() -> None:
    wl = W.synthetic(50, 5.0, "fixed:100", "fixed:40", seed=6)
    cm = ConstantCostModel(per_step=0.01)
    ideal = simulate(wl, SimConfig(PoolConfig(sched(max_decode_steps=8), cm), mode="ideal"))
    engine = simulate(wl, SimConfig(PoolConfig(sched(max_decode_steps=8), cm), mode="engine"))
    # Blind 8-step plans delay admissions, and tokens arrive in bursts of up to 8.
    assert engine.summary["ttft_ms"]["mean"] > ideal.summary["ttft_ms"]["mean"]
    assert engine.itl.zeros > 0 and ideal.itl.zeros == 0
    assert ideal.summary["tpot_ms"]["p50"] == pytest.approx(10.0, rel=1e-3)


def test_slo_goodput_and_classes() -> None:
    mix = {"duration": 20, "tenants": [
        {"name": "chat", "rate": 5, "prompt_len": "fixed:200", "output_len": "fixed:50", "slo": "interactive"},
        {"name": "batch", "rate": 5, "prompt_len": "fixed:2000", "output_len": "fixed:20", "slo": "batch"},
    ]}  # fmt: skip
    wl = W.from_mix(mix, seed=7)
    res = simulate(wl, SimConfig(PoolConfig(sched(), ROOF)))
    s = res.summary
    assert set(s["by_slo_class"]) == {"interactive", "batch"}
    assert s["goodput"] <= s["request_throughput"] + 1e-9
    strict = simulate(wl, SimConfig(PoolConfig(sched(), ROOF), ttft_slo=1e-6))
    assert strict.summary["goodput"] == 0.0


def test_rejects_requests_that_cannot_fit() -> None:
    wl = W.Workload([W.RequestSpec(0.0, 10, 5), W.RequestSpec(0.1, 5000, 5)], vocab_size=100)
    res = simulate(wl, SimConfig(PoolConfig(sched(max_model_len=1024), ROOF)))
    assert res.summary["completed"] == 1 and res.summary["rejected"] == 1


def test_arrival_processes_and_lengths() -> None:
    rng = np.random.default_rng(0)
    t = W.arrival_times("poisson", 10.0, 20000, rng)
    assert 20000 / t[-1] == pytest.approx(10.0, rel=0.05)
    g = np.diff(W.arrival_times("gamma", 10.0, 20000, rng, cv=3.0))
    assert g.std() / g.mean() == pytest.approx(3.0, rel=0.15)
    x = W.LengthDist("lognormal:500,0.7").sample(20000, rng)
    assert x.mean() == pytest.approx(500, rel=0.05)
    az = W.LengthDist("azure", "output").sample(1000, rng)
    assert 100 < az.mean() < 400
    with pytest.raises(ValueError):
        W.LengthDist("weibull:3")
