"""dlpm: LPM order, but a client that has used its deficit waits for the others."""

from __future__ import annotations

from tests.core.policies.driver import admission_order, make_request, make_scheduler, warm_cache

SYSTEM = list(range(100, 132))  # the heavy client's cached system prompt (8 blocks)


def queue(sched) -> None:
    # The heavy client's six cache-hitting requests arrive first, then the light client's three.
    for i in range(6):
        sched.add_request(make_request(f"heavy{i}", SYSTEM + [i], arrival=float(i), client_id="heavy"))
    for i in range(3):
        sched.add_request(make_request(f"light{i}", [1, 2, 3, 4, 5, i], arrival=6.0 + i, client_id="light"))


def run(policy: str, **options) -> list[str]:
    sched = make_scheduler(policy, max_num_seqs=1, policy_options=options)
    warm_cache(sched, SYSTEM + [99])
    queue(sched)
    return admission_order(sched, now=10.0)


def test_deficit_bounds_how_far_lpm_runs_ahead_for_one_client() -> None:
    # Pure LPM serves every cache hit first: the light client waits for all six.
    assert run("lpm") == [f"heavy{i}" for i in range(6)] + ["light0", "light1", "light2"]
    # DLPM: one 33-token prompt plus its 4 outputs (x2) spend the heavy client's
    # 40-token quantum, so the light client is served next.
    order = run("dlpm", quantum=40.0)
    assert order[0] == "heavy0"
    assert order.index("light0") == 1
    # The heavy client keeps its requests in order and all get served.
    assert [r for r in order if r.startswith("heavy")] == [f"heavy{i}" for i in range(6)]


def test_with_a_huge_quantum_it_is_lpm() -> None:
    assert run("dlpm", quantum=1e9) == run("lpm")


def test_locality_within_the_fair_share() -> None:
    """Among one client's requests DLPM still takes cache hits first."""
    sched = make_scheduler("dlpm", max_num_seqs=1, policy_options={"quantum": 1000.0})
    warm_cache(sched, SYSTEM + [99])
    sched.add_request(make_request("cold", [7, 7, 7, 7, 7], arrival=0.0, client_id="a"))
    sched.add_request(make_request("hot", SYSTEM + [1], arrival=1.0, client_id="a"))
    assert admission_order(sched, now=10.0) == ["hot", "cold"]
