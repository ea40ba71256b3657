"""bins: batches are formed from one predicted-output-length bin at a time."""

from __future__ import annotations

from tests.core.policies.driver import admission_order, make_request, make_scheduler, step


def queue(sched) -> None:
    # Interleaved arrivals: short, long, short, long, ...
    for i in range(3):
        sched.add_request(make_request(f"s{i}", [1, 2, 3, i], max_tokens=4, arrival=2.0 * i, predicted_output_len=4))
        sched.add_request(make_request(f"l{i}", [4, 5, 6, i], max_tokens=12, arrival=2.0 * i + 1, predicted_output_len=12))


def test_continuous_batches_cluster_admissions_by_bin() -> None:
    sched = make_scheduler("bins", max_num_seqs=3, policy_options={"bin_edges": [8]})
    queue(sched)
    assert admission_order(sched, now=10.0) == ["s0", "s1", "s2", "l0", "l1", "l2"]
    fcfs = make_scheduler("fcfs", max_num_seqs=3)
    queue(fcfs)
    assert admission_order(fcfs, now=10.0) == ["s0", "l0", "s1", "l1", "s2", "l2"]


def test_static_batches_run_to_completion_one_bin_at_a_time() -> None:
    sched = make_scheduler("bins", max_num_seqs=4, policy_options={"bin_edges": [8], "static": True})
    queue(sched)
    running = []
    now = 10.0
    while sched.has_unfinished():
        step(sched, now)
        running.append(sorted(r.request_id for r in sched.running))
        now += 1.0
    batches = [b for i, b in enumerate(running) if b and (i == 0 or b != running[i - 1])]
    # The short batch runs alone (room for 4, but only its bin joins), drains, then the long one.
    assert batches[0] == ["s0", "s1", "s2"]
    assert ["l0", "l1", "l2"] in batches
    for b in batches:
        assert len({r[0] for r in b}) == 1, f"a batch mixes bins: {b}"


def test_batch_size_bounds_a_bin_so_others_do_not_starve() -> None:
    sched = make_scheduler("bins", max_num_seqs=1, policy_options={"bin_edges": [8], "batch_size": 2})
    queue(sched)
    assert admission_order(sched, now=10.0) == ["s0", "s1", "l0", "l1", "s2", "l2"]


def test_requests_without_a_prediction_use_max_tokens() -> None:
    sched = make_scheduler("bins", policy_options={"bin_edges": [8]})
    assert sched.policy.bin_of(make_request("a", [1], max_tokens=4)) == 0
    assert sched.policy.bin_of(make_request("b", [1], max_tokens=40)) == 1
    assert sched.policy.bin_of(make_request("c", [1], max_tokens=40, predicted_output_len=3)) == 0
