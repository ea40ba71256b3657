"""``StepPlan`` -> ``StepResult`` without a model: a duration from a cost model, synthetic tokens.

The simulator's executor. It samples a fixed token for every sampling
sequence in every sub-step, so that outputs end exactly where the workload
says: simulated requests carry ``SamplingParams(max_tokens=output_len,
ignore_eos=True)``, and the scheduler's own stop checks end them. The
duration of a multi-step plan is the sum over its sub-steps, as the cost
model prices it.
"""

from __future__ import annotations

from typing import Protocol

from tokenmill.core.plan import StepPlan, StepResult


class PlanCostModel(Protocol):
    def plan_time(self, plan: StepPlan) -> float: ...


class SimExecutor:
    """Executes plans in zero wall time; ``duration`` is what the cost model says they take."""

    def __init__(self, cost_model: PlanCostModel, token_id: int = 0) -> None:
        self.cost_model = cost_model
        self.token_id = token_id
        self.num_plans = 0
        self.num_steps = 0

    def execute(self, plan: StepPlan) -> StepResult:
        k = plan.num_steps
        # One list shared by every sequence: the scheduler reads sampled tokens and never mutates them.
        toks = [self.token_id] * k
        sampled = dict.fromkeys([s.request_id for s in plan.seqs if s.samples], toks)
        self.num_plans += 1
        self.num_steps += k
        return StepResult(sampled_token_ids=sampled, duration=self.cost_model.plan_time(plan))
