"""Drive the real Scheduler with hand-built StepResults (no model, no torch)."""

from __future__ import annotations

from typing import Any

from tokenmill.core.plan import StepPlan, StepResult
from tokenmill.core.request import Request, SamplingParams
from tokenmill.core.scheduler import Scheduler, SchedulerConfig


def make_scheduler(policy: str, num_blocks: int = 256, **kw: Any) -> Scheduler:
    options = kw.pop("policy_options", {})
    cfg = dict(num_blocks=num_blocks, block_size=4, max_num_seqs=8, max_num_batched_tokens=256,
               max_model_len=512, debug_checks=True)  # fmt: skip
    cfg.update(kw)
    return Scheduler(SchedulerConfig(policy=policy, policy_options=options, **cfg))


def make_request(rid: str, prompt: list[int], max_tokens: int = 4, arrival: float = 0.0, **fields: Any) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival_time=arrival, **fields)


def step(sched: Scheduler, now: float = 0.0, duration: float = 1.0) -> StepPlan:
    """One schedule -> fake execute -> update round; every sampling sequence gets token 7."""
    plan = sched.schedule(now)
    result = StepResult({s.request_id: [7] * plan.num_steps for s in plan.seqs if s.samples}, duration=duration)
    sched.update(plan, result)
    return plan


def admission_order(sched: Scheduler, now: float = 0.0, max_steps: int = 1000) -> list[str]:
    """Run until nothing is left; the order in which requests were first scheduled."""
    seen: list[str] = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return seen
        plan = step(sched, now)
        for s in plan.seqs:
            if s.request_id not in seen:
                seen.append(s.request_id)
        now += 1.0
    raise AssertionError("the scheduler did not finish")


def warm_cache(sched: Scheduler, prompt: list[int], rid: str = "warm") -> None:
    """Run one request to completion so that the full blocks of ``prompt`` are cached."""
    sched.add_request(make_request(rid, prompt, max_tokens=1))
    admission_order(sched)
