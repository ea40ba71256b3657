"""slo: least slack first; requests that can no longer meet their deadline drop to best effort."""

from __future__ import annotations

from tests.core.policies.driver import admission_order, make_request, make_scheduler, step


def queue(sched) -> None:
    p = [1, 2, 3, 4, 5]
    sched.add_request(make_request("late", p, arrival=0.0, ttft_slo=1.0))  # deadline 1: missed at t=10
    sched.add_request(make_request("loose", p, arrival=1.0, ttft_slo=100.0))  # deadline 101
    sched.add_request(make_request("nosla", p, arrival=2.0))  # best effort
    sched.add_request(make_request("tight", p, arrival=9.0, ttft_slo=3.0))  # deadline 12


def test_slack_order_and_relegation() -> None:
    orders = {}
    for name, policy, options in [
        ("fcfs", "fcfs", {}),
        ("slo", "slo", {}),
        ("edf", "slo", {"relegate": False}),
    ]:
        sched = make_scheduler(policy, max_num_seqs=1, policy_options=options)
        queue(sched)
        orders[name] = admission_order(sched, now=10.0)
    assert orders["fcfs"] == ["late", "loose", "nosla", "tight"]
    # Plain least-slack-first serves the hopeless request first and makes "tight" late too.
    assert orders["edf"][:2] == ["late", "tight"]
    # With relegation, live deadlines go first by slack; the missed one joins best effort (by arrival).
    assert orders["slo"] == ["tight", "loose", "late", "nosla"]


def test_service_time_estimate_relegates_before_the_deadline_passes() -> None:
    # At t=10, "tight" still has 2 s to its deadline but needs 50 tokens at 10 tokens/s.
    sched = make_scheduler("slo", max_num_seqs=1, policy_options={"prefill_tokens_per_s": 10.0})
    sched.add_request(make_request("tight", list(range(1, 51)), arrival=9.0, ttft_slo=3.0))
    sched.add_request(make_request("ok", [1, 2, 3], arrival=9.5, ttft_slo=20.0))
    assert admission_order(sched, now=10.0) == ["ok", "tight"]
    assert "tight" not in sched.policy.relegated  # forgotten once finished


def test_priority_classes_give_deadlines() -> None:
    opts = {"ttft_slo_by_priority": {0: 2.0, 1: 50.0}}
    sched = make_scheduler("slo", max_num_seqs=1, policy_options=opts)
    sched.add_request(make_request("batch", [1, 2, 3], arrival=0.0, priority=1))
    sched.add_request(make_request("interactive", [1, 2, 3], arrival=0.5, priority=0))
    assert admission_order(sched, now=1.0) == ["interactive", "batch"]


def test_preemption_takes_best_effort_first() -> None:
    # Three blocks of 4 tokens: x's first decode needs a second block when none is free.
    preempted = {}
    for policy in ("fcfs", "slo"):
        sched = make_scheduler(policy, num_blocks=3, max_num_seqs=4)
        reqs = [
            make_request("x", [1, 2, 3, 4], max_tokens=3, arrival=0.0),
            make_request("be", [5, 6, 7], max_tokens=2, arrival=1.0),
            make_request("sla", [8, 9, 10], max_tokens=2, arrival=2.0, ttft_slo=100.0, tpot_slo=100.0),
        ]
        for r in reqs:
            sched.add_request(r)
        step(sched, 3.0)
        step(sched, 4.0)
        preempted[policy] = [r.request_id for r in reqs if r.num_preemptions]
        admission_order(sched, now=5.0)
    assert preempted == {"fcfs": ["sla"], "slo": ["be"]}
