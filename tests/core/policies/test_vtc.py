"""vtc: the client with the least service goes next; a returning client's counter is lifted."""

from __future__ import annotations

from tests.core.policies.driver import admission_order, make_request, make_scheduler, step


def test_a_flooding_client_does_not_starve_a_light_one() -> None:
    orders = {}
    for policy in ("fcfs", "vtc"):
        sched = make_scheduler(policy, max_num_seqs=1)
        for i in range(8):
            sched.add_request(make_request(f"A{i}", [1, 2, 3, 4], arrival=float(i), client_id="A"))
        for i in range(2):
            sched.add_request(make_request(f"B{i}", [5, 6, 7, 8], arrival=10.0 + i, client_id="B"))
        orders[policy] = admission_order(sched, now=20.0)
    assert orders["fcfs"] == [f"A{i}" for i in range(8)] + ["B0", "B1"]
    # Equal costs per request: VTC alternates while both are backlogged.
    assert orders["vtc"][:4] == ["A0", "B0", "A1", "B1"]


def test_counter_lift_keeps_an_idle_client_from_banking_credit() -> None:
    sched = make_scheduler("vtc", max_num_seqs=1)
    policy = sched.policy
    # A alone for a while: work-conserving, it gets everything.
    for i in range(4):
        sched.add_request(make_request(f"A{i}", [1, 2, 3, 4], client_id="A"))
    now = 0.0
    while sched.num_waiting > 1:
        step(sched, now)
        now += 1.0
    assert policy.counters["A"] > 0
    # B shows up with a backlog of its own. Without the lift its counter would be 0
    # and all its requests would go before A's; lifted, they interleave with A's.
    for i in range(3):
        sched.add_request(make_request(f"B{i}", [5, 6, 7, 8], arrival=now, client_id="B"), now)
    assert policy.counters["B"] == policy.counters["A"]
    order = admission_order(sched, now=now)
    waiting_a = [r for r in order if r.startswith("A")]
    assert order.index(waiting_a[-1]) < order.index("B2")  # A's last request is not pushed behind all of B's


def test_input_and_output_tokens_are_weighted() -> None:
    sched = make_scheduler("vtc", policy_options={"input_weight": 1.0, "output_weight": 3.0})
    sched.add_request(make_request("x", [1] * 10, max_tokens=4, client_id="c"))
    admission_order(sched)
    assert sched.policy.counters["c"] == 10 * 1.0 + 4 * 3.0
