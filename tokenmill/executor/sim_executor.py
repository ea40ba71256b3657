"""``StepPlan`` -> ``StepResult`` without a model: a duration from a cost model, synthetic tokens.

The simulator's executor. It samples a fixed token for every sampling
sequence in every sub-step, so that outputs end exactly where the workload
says: simulated requests carry ``SamplingParams(max_tokens=output_len,
ignore_eos=True)``, and the scheduler's own stop checks end them. The
duration of a multi-step plan is the sum over its sub-steps, as the cost
model prices it.

Speculative decoding: a sequence that verifies ``k`` drafts accepts each in
turn with probability ``acceptance`` (a workload parameter) until the first
rejection, drawn from a seeded generator, and gets the accepted drafts plus
one token; a sequence asked to propose gets that many (synthetic) drafts.
"""

from __future__ import annotations

import random
from typing import Protocol

from tokenmill.core.plan import StepPlan, StepResult


class PlanCostModel(Protocol):
    def plan_time(self, plan: StepPlan) -> float: ...


class VirtualClock:
    """Seconds of simulated time: an ``Engine`` clock that a ``SimExecutor`` moves forward."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance_to(self, t: float) -> None:
        """Jump ahead (e.g. to the next arrival while idle); time never runs back."""
        self.now = max(self.now, t)


class SimExecutor:
    """Executes plans in zero wall time; ``duration`` is what the cost model says they take.

    Given a ``clock``, it advances it by each plan's duration, so an ``Engine``
    driven by that clock runs in virtual time with its own step loop. The
    model facts an engine asks an executor for (``num_blocks``,
    ``max_model_len``, ``vocab_size``, ``eos_token_ids``) are given here.
    """

    def __init__(
        self,
        cost_model: PlanCostModel,
        token_id: int = 0,
        *,
        clock: VirtualClock | None = None,
        num_blocks: int = 0,
        max_model_len: int = 1 << 30,
        vocab_size: int = 1 << 30,
        eos_token_ids: tuple[int, ...] = (),
        acceptance: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"acceptance must be in [0, 1], got {acceptance}")
        self.acceptance = acceptance
        self._rng = random.Random(seed)
        self.cost_model = cost_model
        self.token_id = token_id
        self.clock = clock
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.num_plans = 0
        self.num_steps = 0

    def execute(self, plan: StepPlan, on_substep: object = None) -> StepResult:
        """Price the plan (``on_substep`` is accepted for the executor interface; a simulated
        plan has no time between its sub-steps to stream in)."""
        k = plan.num_steps
        # One list shared by every sequence: the scheduler reads sampled tokens and never mutates them.
        toks = [self.token_id] * k
        sampled = dict.fromkeys([s.request_id for s in plan.seqs if s.samples], toks)
        drafts: dict[str, list[int]] | None = None
        if k == 1 and any(s.draft_token_ids or s.num_propose for s in plan.seqs):
            rand, acc, tok = self._rng.random, self.acceptance, self.token_id
            drafts = {}
            for s in plan.seqs:
                if s.draft_token_ids and s.samples:
                    j = 0
                    while j < len(s.draft_token_ids) and rand() < acc:
                        j += 1
                    sampled[s.request_id] = [tok] * (j + 1)
                if s.num_propose:
                    drafts[s.request_id] = [tok] * s.num_propose
        self.num_plans += 1
        self.num_steps += k
        duration = self.cost_model.plan_time(plan)
        if self.clock is not None:
            self.clock.now += duration
        return StepResult(sampled_token_ids=sampled, duration=duration, draft_token_ids=drafts)
