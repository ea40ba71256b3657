"""Step-time jitter: quantiles of measured ratios, a cost model drawing from them, robust profile medians."""

from __future__ import annotations

import statistics

import pytest

from tokenmill.core.scheduler import SchedulerConfig
from tokenmill.sim import workload as W
from tokenmill.sim.config import PoolConfig, SimConfig
from tokenmill.sim.cost_model import ConstantCostModel
from tokenmill.sim.jitter import JitterCostModel, ratio_quantiles
from tokenmill.sim.profiler import robust_median
from tokenmill.sim.simulator import simulate


def test_ratio_quantiles_are_relative_to_the_median() -> None:
    q = ratio_quantiles([1.0, 2.0, 2.0, 2.0, 4.0])
    assert len(q) == 101 and q[0] == 0.5 and q[50] == 1.0 and q[-1] == 2.0
    assert q == sorted(q)
    with pytest.raises(ValueError):
        ratio_quantiles([])


def test_jitter_cost_model_draws_from_the_distribution_reproducibly() -> None:
    q = ratio_quantiles([1.0] * 80 + [3.0] * 20)  # one step in five stalls to three times the median
    a, b = JitterCostModel(ConstantCostModel(0.01), q, seed=1), JitterCostModel(ConstantCostModel(0.01), q, seed=1)
    draws = [a.draw() for _ in range(2000)]
    assert draws == [b.draw() for _ in range(2000)]
    assert min(draws) >= 1.0 and max(draws) <= 3.0
    assert 1.25 < statistics.fmean(draws) < 1.55 and abs(a.mean_ratio - statistics.fmean(draws)) < 0.1
    # A k-step plan averages k draws: its ratio spreads less.
    multi = [a.draw(8) for _ in range(2000)]
    assert statistics.pstdev(multi) < statistics.pstdev(draws) / 2
    with pytest.raises(ValueError):
        JitterCostModel(ConstantCostModel(), [2.0, 1.0])


def test_jitter_lengthens_the_twins_tails() -> None:
    wl = W.synthetic(200, 40.0, "fixed:64", "fixed:16", vocab_size=1000, seed=0)
    cfg = SchedulerConfig(num_blocks=200, block_size=16, max_num_seqs=16, max_num_batched_tokens=128,
                          max_model_len=512, max_decode_steps=1)  # fmt: skip
    base = ConstantCostModel(0.004, 2e-5)
    plain = simulate(wl, SimConfig(PoolConfig(cfg, base), mode="engine")).summary
    q = ratio_quantiles([1.0] * 90 + [4.0] * 10)
    jit = simulate(wl, SimConfig(PoolConfig(cfg, JitterCostModel(base, q, seed=0)), mode="engine")).summary
    assert jit["tpot_ms"]["p90"] > plain["tpot_ms"]["p90"] * 1.1
    assert jit["ttft_ms"]["p99"] > plain["ttft_ms"]["p99"]


def test_robust_median_drops_stalls() -> None:
    assert robust_median([1.0, 1.1, 0.9, 1.05, 9.0, 8.0]) == pytest.approx(1.025)
    assert statistics.median([1.0, 1.1, 0.9, 1.05, 9.0, 8.0]) > 1.05
    assert robust_median([2.0, 2.0, 2.0]) == 2.0
