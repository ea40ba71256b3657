"""The cost-model interface: how long a ``StepPlan`` takes, from a few numbers that describe it.

A plan is reduced to ``StepFeatures`` (tokens, sampling rows, decode context,
prefill attention work); a cost model maps them to seconds. A multi-step plan
(``num_steps`` one-token decodes of the same sequences) costs the sum of its
sub-steps, where each sub-step's context is one token longer per sequence than
the one before; ``decode_time`` prices that sum directly so that the simulator
can also ask "how many sub-steps fit before the next arrival?" without
building a plan.

LoRA: a (sub-)step's adapter work depends on how many distinct adapters it
runs (``num_loras``: each one's weights are read once, the grouped kernels'
point) and on how many of its rows run one (``lora_tokens``); it is the same
in every sub-step of a multi-step plan, so ``plan_time`` adds ``lora_time``
per sub-step. The base class prices it at zero.

``ReplayCostModel`` returns recorded durations in order; it is how the twin
replays a real engine run to check that both make the same decisions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenmill.core.plan import StepPlan


@dataclass(slots=True)
class StepFeatures:
    """What one (sub-)step computes, as the cost models see it."""

    num_seqs: int = 0
    num_tokens: int = 0  # new tokens (rows of every GEMM)
    num_samples: int = 0  # rows that go through the LM head and the sampler
    num_decode: int = 0  # one-token sampling sequences
    decode_context: int = 0  # sum over decode sequences of the KV length they attend to (incl. the new token)
    prefill_tokens: int = 0  # new tokens of the other (prompt or recompute) sequences
    prefill_pairs: int = 0  # causal query-key pairs of those sequences
    prefill_kv: int = 0  # KV tokens those sequences read (prior context + their own)
    prefill_context: int = 0  # prior context of those sequences (KV computed in earlier steps)
    # Speculative decoding: draft tokens verified (in num_tokens and num_samples; a decode
    # that verifies k drafts reads its KV once, its context counted to the last draft), and
    # the proposal after the step: sequences proposing, draft steps (the longest proposal),
    # and their context.
    draft_tokens: int = 0
    propose_seqs: int = 0
    propose_steps: int = 0
    propose_context: int = 0
    num_loras: int = 0  # distinct LoRA adapters the step runs
    lora_tokens: int = 0  # new tokens of the sequences that run one


def plan_features(plan: StepPlan) -> StepFeatures:
    """The features of a plan's first sub-step."""
    f = StepFeatures(num_seqs=len(plan.seqs))
    loras: set[int] = set()
    for s in plan.seqs:
        q = s.num_new_tokens
        c0 = s.start_pos
        k = len(s.draft_token_ids)
        f.num_tokens += q + k
        if s.num_propose:
            f.propose_seqs += 1
            f.propose_context += c0 + q + k + 1
            if s.num_propose > f.propose_steps:
                f.propose_steps = s.num_propose
        if s.lora_id:
            loras.add(s.lora_id)
            f.lora_tokens += q
        if s.samples:
            f.num_samples += 1 + k
            if q == 1:
                f.num_decode += 1
                f.decode_context += c0 + 1 + k
                f.draft_tokens += k
                continue
        f.prefill_tokens += q
        f.prefill_pairs += q * c0 + q * (q + 1) // 2
        f.prefill_kv += c0 + q
        f.prefill_context += c0
    f.num_loras = len(loras)
    return f


def plan_loras(plan: StepPlan) -> tuple[int, int]:
    """(distinct adapters, sequences that run one) of a plan; for a multi-step plan of
    one-token decodes the second is its LoRA rows per sub-step."""
    ids = [s.lora_id for s in plan.seqs if s.lora_id]
    return len(set(ids)), len(ids)


class CostModel:
    """Base class: subclasses price one step (``step_time``); the rest follows.

    ``draft_cost`` prices speculative decoding's proposals: each draft step costs
    that fraction of a target decode step of the proposing sequences (the
    draft's bytes over the target's, about 0 for prompt lookup).
    """

    name = "base"
    draft_cost = 0.0

    def step_time(self, f: StepFeatures) -> float:
        raise NotImplementedError

    def lora_time(self, num_loras: int, tokens: int) -> float:
        """Seconds of LoRA work in one (sub-)step: ``num_loras`` adapters over ``tokens`` rows."""
        return 0.0

    def decode_time(self, num_seqs: int, context: int, num_steps: int) -> float:
        """Seconds for ``num_steps`` decode sub-steps of ``num_seqs`` sequences.

        ``context`` is the total KV length attended in the first sub-step
        (each sequence's prior tokens plus its new one); it grows by
        ``num_seqs`` per sub-step. Subclasses replace this loop with a closed form.
        """
        total = 0.0
        f = StepFeatures(num_seqs=num_seqs, num_tokens=num_seqs, num_samples=num_seqs, num_decode=num_seqs)
        for j in range(num_steps):
            f.decode_context = context + j * num_seqs
            total += self.step_time(f)
        return total

    def plan_time(self, plan: StepPlan) -> float:
        """Seconds for the whole plan (all its sub-steps)."""
        k = plan.num_steps
        if k > 1:
            # Multi-step plans hold one-token decodes only (the scheduler guarantees it).
            ctx = 0
            for s in plan.seqs:
                ctx += s.start_pos
            n = len(plan.seqs)
            num_loras, rows = plan_loras(plan)
            lora = k * self.lora_time(num_loras, rows) if num_loras else 0.0
            return self.decode_time(n, ctx + n, k) + lora
        f = plan_features(plan)
        return self.step_time(f) + self.draft_time(f)

    def draft_time(self, f: StepFeatures) -> float:
        """Seconds of the proposal after a step: ``propose_steps`` draft decode steps."""
        if not f.propose_steps or self.draft_cost <= 0.0:
            return 0.0
        m = f.propose_seqs
        one = self.step_time(StepFeatures(num_seqs=m, num_tokens=m, num_samples=m, num_decode=m,
                                          decode_context=f.propose_context))  # fmt: skip
        return self.draft_cost * f.propose_steps * one

    def on_plan_done(self, plan: StepPlan) -> None:
        """The simulator finished ``plan`` (stateful models, such as a replay, advance here)."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class ReplayCostModel(CostModel):
    """Recorded step durations, in order: sub-step ``i`` of the run costs ``durations[i]``.

    Durations are per *single* step; a k-step plan costs the next k of them,
    so a twin that plans multi-step can replay a single-stepping engine. For an
    engine that itself planned multi-step, pass ``per_plan=True`` and one
    duration per plan.
    """

    name = "replay"

    def __init__(self, durations: Sequence[float], per_plan: bool = False) -> None:
        self.durations = list(durations)
        self.per_plan = per_plan
        self.cursor = 0

    def _take(self, k: int) -> float:
        if self.per_plan:
            k = 1
        end = self.cursor + k
        if end > len(self.durations):
            raise IndexError(f"the replay ran past its {len(self.durations)} recorded steps")
        return sum(self.durations[self.cursor : end])

    def step_time(self, f: StepFeatures) -> float:
        return self._take(1)

    def decode_time(self, num_seqs: int, context: int, num_steps: int) -> float:
        return self._take(num_steps)

    def plan_time(self, plan: StepPlan) -> float:
        return self._take(plan.num_steps)

    def on_plan_done(self, plan: StepPlan) -> None:
        self.cursor += 1 if self.per_plan else plan.num_steps


class ConstantCostModel(CostModel):
    """Every sub-step costs ``per_step`` plus ``per_token`` per new token (tests and quick looks)."""

    name = "constant"

    def __init__(self, per_step: float = 0.01, per_token: float = 0.0) -> None:
        self.per_step = per_step
        self.per_token = per_token

    def step_time(self, f: StepFeatures) -> float:
        return self.per_step + self.per_token * f.num_tokens

    def decode_time(self, num_seqs: int, context: int, num_steps: int) -> float:
        return num_steps * (self.per_step + self.per_token * num_seqs)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "per_step": self.per_step, "per_token": self.per_token}


def knee_tokens(cm: CostModel, ratio: float = 1.25, limit: int = 4096) -> int:
    """Tokens a step can compute for at most ``ratio`` times the cost of a one-token decode.

    Where decode is memory bound, verifying a few more tokens costs little; past
    this point a step is compute bound (``core/spec.py`` backs off there).
    """

    def cost(t: int) -> float:
        return cm.step_time(StepFeatures(num_seqs=1, num_tokens=t, num_samples=1, num_decode=1, decode_context=t))

    base = cost(1)
    t = 1
    while t < limit and cost(2 * t) <= ratio * base:
        t *= 2
    return t


def steps_until(cm: CostModel, num_seqs: int, context: int, horizon: float, kmax: int) -> int:
    """Smallest k <= kmax with ``decode_time(k) >= horizon`` (kmax when none is)."""
    dt = cm.decode_time
    d1 = dt(num_seqs, context, 1)
    if d1 >= horizon or kmax <= 1:
        return 1
    if d1 <= 0.0:
        return kmax  # free steps never reach the horizon
    k = min(int(horizon / d1) + 1, kmax)
    # Sub-steps only get slower as context grows, so D(k) >= k * d1 >= horizon usually holds here;
    # a noisy profiled table may break that, hence the doubling.
    while dt(num_seqs, context, k) < horizon:
        if k >= kmax:
            return kmax
        k = min(2 * k, kmax)
    if dt(num_seqs, context, k - 1) < horizon:
        return k
    lo, hi = 1, k - 1  # D(lo) < horizon <= D(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if dt(num_seqs, context, mid) >= horizon:
            hi = mid
        else:
            lo = mid
    return hi
