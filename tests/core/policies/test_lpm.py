"""lpm: cached prompts go first, a shared uncached prefix is computed once, and the FCFS cutoff is visible."""

from __future__ import annotations

from tests.core.policies.driver import (
    admission_order,
    make_request,
    make_scheduler,
    step,
    warm_cache,
)

SYSTEM = list(range(100, 132))  # 32 tokens = 8 full blocks


def queue(sched) -> None:
    # Arrival order: cold, hot, cold, hot.
    sched.add_request(make_request("cold1", [1, 2, 3, 4, 5, 6], arrival=1.0))
    sched.add_request(make_request("hot1", SYSTEM + [9], arrival=2.0))
    sched.add_request(make_request("cold2", [6, 5, 4, 3, 2, 1], arrival=3.0))
    sched.add_request(make_request("hot2", SYSTEM + [8], arrival=4.0))


def test_longest_cached_prefix_is_admitted_first() -> None:
    # One admission per step, so the order is the policy's alone.
    for policy, expected in [("fcfs", ["cold1", "hot1", "cold2", "hot2"]), ("lpm", ["hot1", "hot2", "cold1", "cold2"])]:
        sched = make_scheduler(policy, max_num_seqs=1)
        warm_cache(sched, SYSTEM + [0])
        queue(sched)
        assert admission_order(sched, now=10.0) == expected, policy
        if policy == "lpm":
            assert sched.stats().prefix_hit_tokens == 2 * 32  # both hot prompts hit all 8 blocks


def test_cutoff_is_a_visible_option() -> None:
    sched = make_scheduler("lpm", max_num_seqs=1, policy_options={"max_sort_len": 3})
    warm_cache(sched, SYSTEM + [0])
    queue(sched)  # 4 waiting > 3: arrival order, until the queue is short enough to sort
    order = admission_order(sched, now=10.0)
    assert order[:2] == ["cold1", "hot1"]
    assert order[2:] == ["hot2", "cold2"]  # three left: sorted again


def test_requests_sharing_an_uncached_prefix_wait_for_the_first_to_compute_it() -> None:
    hits = {}
    for check in (None, 32):
        sched = make_scheduler("lpm", policy_options={"in_batch_prefix_tokens": check})
        for i in range(4):
            sched.add_request(make_request(f"q{i}", SYSTEM + [i], arrival=float(i)))
        first = [s.request_id for s in step(sched, 0.0).seqs]
        admission_order(sched, now=1.0)
        hits[check] = (first, sched.stats().prefix_hit_tokens)
    assert hits[None] == (["q0", "q1", "q2", "q3"], 0)  # all four compute the same 32 tokens
    assert hits[32] == (["q0"], 3 * 32)  # one computes it, three reuse it a step later

