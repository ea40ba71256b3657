"""``sim search`` judges candidates at steady state: the rate it picks holds its SLO attainment when the
same deployment is run again on far longer workloads, where a rate found on a short burst does not."""

from __future__ import annotations

from tokenmill.sim import workload as W
from tokenmill.sim.build import DeploymentSpec
from tokenmill.sim.config import SimConfig
from tokenmill.sim.search import SearchSpec, _pool, search, trial
from tokenmill.sim.simulator import simulate


def spec() -> SearchSpec:
    # One replica of 32 sequences: its queue fills within seconds of simulated time, which
    # keeps the runs short; bursts of long requests (lognormal lengths) make it queue at times.
    return SearchSpec(DeploymentSpec(model="llama-3-8b", hardware="h100", max_num_seqs=32), ttft_slo=0.5,
                      tpot_slo=0.05, max_replicas=1, disaggregated=False, num_requests=100, duration=20.0,
                      prompt_len="lognormal:512,0.8", output_len="lognormal:128,0.8")  # fmt: skip


def attainment_over(s: SearchSpec, rate: float, num_requests: int, seed: int) -> float:
    """Every request of a fresh workload counted, warm-up included: the plain measure."""
    pool, _ = _pool(s.deployment, 1, s.router)
    wl = W.synthetic(num_requests, rate, s.prompt_len, s.output_len, seed=seed)
    wl.clip(pool.scheduler.max_model_len - 1)
    summary = simulate(wl, SimConfig(pool, ttft_slo=s.ttft_slo, tpot_slo=s.tpot_slo, num_samples=1)).summary
    assert summary["completed"] == num_requests
    return float(summary["slo_attainment"])


def test_best_rate_holds_on_longer_runs() -> None:
    s = spec()
    best = search(s)["best"]
    rate = best["max_rate"]
    assert rate > 0 and best["confirmed"]["attainment"] >= s.attainment
    assert best["confirmed"]["arrival_s"] >= 2 * s.duration
    # 2,500 fresh requests at that rate are about 110 s of arrivals, twice the longest run of the
    # search. (Picked on 100-request bursts, the rate is about twice as high and meets the SLO
    # for 2% of such a run.)
    runs = [attainment_over(s, rate, 2500, seed) for seed in (123, 7)]
    assert sum(runs) / len(runs) >= s.attainment - 0.02, runs


def test_a_rate_above_capacity_fails_its_trial_early() -> None:
    # 40 req/s is far above what one replica sustains here: a 100-request burst at that rate meets
    # the SLO for most of its requests; sustained for 20 s it does not, and the trial stops as soon
    # as more requests have missed than the target allows.
    s = spec()
    t = trial(s, 0, 1, 40.0)
    assert t["requests"] == 800 and t["stopped_early"] and not t["ok"]
    assert t["attainment"] < s.attainment
    assert trial(s, 0, 1, 5.0)["ok"]
