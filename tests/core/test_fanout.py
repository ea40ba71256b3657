"""The samples of one user request share a bounded number of running slots (issue: n=128 held everyone).

A request with ``n`` samples becomes ``n`` core requests with one ``parent_id``.
Under any policy they may fill every free slot while nobody else waits (work
conserving), but a request of another parent that arrives behind them is
admitted at the next ``schedule``: samples beyond ``max_seqs_per_request``
give up their slots (preempted by recompute, full blocks stay cached) and
wait while others do. So the newcomer's first token comes after at most the
plan in flight (``max_decode_steps`` steps) plus its own prefill plans,
whatever the fan-out's ``n`` and ``max_tokens``.
"""

from __future__ import annotations

import pytest

from tests.core.fake_executor import FakeKVExecutor, reference_output
from tokenmill.core import Request, SamplingParams
from tokenmill.core.scheduler import Scheduler, SchedulerConfig


def fan_out(parent: str, n: int, prompt: list[int], max_tokens: int, t: float = 0.0) -> list[Request]:
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [Request(f"{parent}#{i}", prompt, sp, arrival_time=t, parent_id=parent, sample_index=i) for i in range(n)]


def config(**kw) -> SchedulerConfig:
    base = dict(num_blocks=1024, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256,
                max_decode_steps=4, max_seqs_per_request=2, debug_checks=True)  # fmt: skip
    base.update(kw)
    return SchedulerConfig(**base)


def drive(sched: Scheduler, arrivals: dict[int, list[Request]], max_plans: int = 5000):
    """Run plan by plan, adding ``arrivals[i]`` before plan ``i``; return (plans, first-token plan index)."""
    ex = FakeKVExecutor(sched.config.num_blocks, sched.config.block_size)
    plans, first_token = [], {}
    for i in range(max_plans):
        for r in arrivals.get(i, []):
            sched.add_request(r, float(i))
        if not sched.has_unfinished() and i > max(arrivals):
            break
        plan = sched.schedule(float(i))
        plans.append(plan)
        for u in sched.update(plan, ex.execute(plan)):
            if u.new_token_ids and u.request_id not in first_token:
                first_token[u.request_id] = i
    assert not sched.has_unfinished(), "requests got stuck"
    assert sched.kv.pool.num_used == 0
    return plans, first_token


@pytest.mark.parametrize("policy", ["fcfs", "lpm", "vtc", "dlpm", "slo"])
def test_a_short_request_behind_a_big_fan_out_starts_at_the_next_plan(policy: str) -> None:
    sched = Scheduler(config(policy=policy))
    big = fan_out("big", 32, list(range(1, 11)), max_tokens=120)
    short = Request("short", [50, 51, 52, 53, 54], SamplingParams(max_tokens=4, ignore_eos=True), parent_id="short")
    plans, first = drive(sched, {0: big, 3: [short]})
    # Alone, the fan-out takes every slot (nothing is kept idle).
    assert all(len(p.seqs) == 8 for p in plans[1:3])
    # The short request arrived while plan 2 ran: it samples its first token in plan 3,
    # the first plan after its arrival (before the share: plan 128).
    assert first["short"] == 3
    assert len(plans[3].preempted_ids) == 1  # one sample gave up its slot for it
    # The samples that gave up their slots lost nothing: outputs are exact.
    for r in big + [short]:
        assert r.output_token_ids == reference_output(r.prompt_token_ids, r.sampling_params.max_tokens)


def test_many_waiting_parents_shrink_a_fan_out_to_its_cap_and_no_further() -> None:
    sched = Scheduler(config(max_decode_steps=1))
    big = fan_out("big", 16, list(range(1, 11)), max_tokens=60)
    others = [Request(f"o{i}", [60 + i] * 6, SamplingParams(max_tokens=40, ignore_eos=True), arrival_time=1.0,
                      parent_id=f"o{i}") for i in range(10)]  # fmt: skip
    ex = FakeKVExecutor(1024, 4)
    for r in big:
        sched.add_request(r, 0.0)
    sched.update(p := sched.schedule(0.0), ex.execute(p))
    for r in others:
        sched.add_request(r, 1.0)
    for t in range(1, 6):
        plan = sched.schedule(float(t))
        held = sum(1 for r in sched.running if r.parent_id == "big")
        assert held >= 2, "a fan-out keeps its share"
        assert len(sched.running) == 8
        sched.update(plan, ex.execute(plan))
    # 10 others wait for 8 slots: the fan-out is down to its cap of 2, six others run.
    assert sum(1 for r in sched.running if r.parent_id == "big") == 2


def test_without_the_cap_fcfs_keeps_arrival_order() -> None:
    sched = Scheduler(config(max_seqs_per_request=None))
    big = fan_out("big", 32, list(range(1, 11)), max_tokens=20)
    short = Request("short", [50, 51, 52], SamplingParams(max_tokens=4, ignore_eos=True), parent_id="short")
    _, first = drive(sched, {0: big, 3: [short]})
    assert first["short"] > 3 * 20 // 4  # it waited for the first three rounds of samples


def test_cap_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_seqs_per_request"):
        config(max_seqs_per_request=0)
