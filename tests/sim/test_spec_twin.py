"""The twin prices speculative steps (verify tokens plus the draft's steps) with acceptance as a
workload parameter, and runs the engine's own speculation decisions."""

from __future__ import annotations

import copy

import pytest

from tests.sim.test_simulator import ROOF, sched
from tokenmill.core.plan import ScheduledSeq, StepPlan
from tokenmill.executor.sim_executor import SimExecutor
from tokenmill.sim import workload as W
from tokenmill.sim.config import PoolConfig, SimConfig
from tokenmill.sim.cost_model import knee_tokens, plan_features
from tokenmill.sim.simulator import simulate


def _plan(drafts: int, propose: int) -> StepPlan:
    seq = ScheduledSeq("a", 511, 1, [7], 0, [], True, None, draft_token_ids=[7] * drafts, num_propose=propose)
    return StepPlan(1, 0.0, [seq])


def test_a_speculative_step_costs_its_verify_tokens_and_the_draft_steps() -> None:
    cm = copy.copy(ROOF)
    f = plan_features(_plan(4, 4))
    assert (f.num_tokens, f.num_samples, f.draft_tokens, f.propose_steps) == (5, 5, 4, 4)
    plain, verify = cm.plan_time(_plan(0, 0)), cm.plan_time(_plan(4, 0))
    assert plain < verify < 1.1 * plain  # decode is memory bound: 4 more tokens are nearly free
    cm.draft_cost = 0.1
    assert cm.plan_time(_plan(4, 4)) == pytest.approx(verify + 0.4 * cm.plan_time(_plan(0, 0)), rel=0.05)
    assert 64 <= knee_tokens(ROOF) <= 1024  # an 8B model on an H100 stays memory bound for a while


def test_the_sim_executor_accepts_drafts_at_the_workload_rate() -> None:
    ex = SimExecutor(ROOF, acceptance=0.75, seed=3)
    got = [len(ex.execute(_plan(4, 2)).sampled_token_ids["a"]) - 1 for _ in range(4000)]
    # accepted drafts ~ truncated geometric: E = a + a^2 + a^3 + a^4
    assert sum(got) / len(got) == pytest.approx(sum(0.75**i for i in range(1, 5)), rel=0.05)
    assert ex.execute(_plan(0, 2)).draft_token_ids == {"a": [0, 0]}


@pytest.mark.parametrize("acceptance", [0.0, 0.85])
def test_speculation_in_the_twin_helps_when_drafts_are_good_and_backs_off_when_not(acceptance: float) -> None:
    wl = W.synthetic(20, 0.2, "fixed:256", "fixed:128", seed=2)
    cm = copy.copy(ROOF)
    cm.draft_cost = 0.05
    base = simulate(wl, SimConfig(PoolConfig(sched(), cm))).summary
    spec_sched = sched(num_speculative_tokens=8, speculative_draft_cost=0.05, speculative_knee_tokens=knee_tokens(cm))
    spec = simulate(wl, SimConfig(PoolConfig(spec_sched, cm, spec_acceptance=acceptance))).summary
    assert spec["completed"] == 20 and spec["total_output_tokens"] == base["total_output_tokens"]
    if acceptance:
        assert spec["tpot_ms"]["mean"] < 0.6 * base["tpot_ms"]["mean"]
    else:  # drafts never accepted: the controller stops drafting after a few tries
        assert spec["tpot_ms"]["mean"] < 1.2 * base["tpot_ms"]["mean"]
