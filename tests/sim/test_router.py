"""Routers in the core: what each one picks, and that finishes release their charge."""

from __future__ import annotations

import pytest

from tokenmill.core.request import Request, SamplingParams
from tokenmill.core.router import available_routers, make_router


def req(rid: str, prompt: list[int], out: int = 10) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=out))


def test_registry() -> None:
    assert {"round_robin", "least_outstanding_tokens", "prefix_aware"} <= set(available_routers())
    with pytest.raises(ValueError, match="unknown router"):
        make_router("random", 2)
    with pytest.raises(ValueError, match="at least one"):
        make_router("round_robin", 0)


def test_round_robin_cycles() -> None:
    r = make_router("round_robin", 3)
    assert [r.route(req(str(i), [1])) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_least_outstanding_tokens_balances_work_not_counts() -> None:
    r = make_router("least_outstanding_tokens", 2)
    big = req("big", [1] * 1000, out=100)
    assert r.route(big) == 0
    # Two small requests both go to the idle replica: it still has less work.
    assert r.route(req("a", [1] * 10)) == 1
    assert r.route(req("b", [1] * 10)) == 1
    assert r.outstanding_tokens == [1100, 40]
    r.on_finished(big)
    assert r.outstanding_tokens == [0, 40]
    assert r.route(req("c", [1] * 10)) == 0
    r.on_finished(big)  # twice: ignored
    assert r.outstanding_requests == [1, 2]


def test_prefix_aware_follows_prefixes_until_unbalanced() -> None:
    r = make_router("prefix_aware", 4, block_size=4, balance_abs_threshold=200, balance_rel_threshold=2.0)
    sys_a = list(range(100, 132))
    sys_b = list(range(200, 232))
    first = r.route(req("a0", sys_a + [1, 2]))
    other = r.route(req("b0", sys_b + [1, 2]))
    assert other != first
    # Requests with the same system prompt follow it.
    assert [r.route(req(f"a{i}", sys_a + [i, i])) for i in range(1, 4)] == [first] * 3
    # Different namespaces never share a prefix.
    ns = Request("n0", sys_a + [9, 9], SamplingParams(max_tokens=10), cache_namespace="tenant-2")
    assert r.route(ns) != first
    # Once the favourite is far busier than the idlest replica, balance wins.
    for i in range(4, 12):
        r.route(req(f"a{i}", sys_a + [i, i]))
    assert r.route(req("a99", sys_a + [7, 7])) != first


@pytest.mark.parametrize("name", ["round_robin", "least_outstanding_tokens", "prefix_aware"])
def test_a_replica_that_is_down_is_never_picked_until_it_is_back(name: str) -> None:
    r = make_router(name, 3)
    r.set_available(1, False)
    picks = [r.route(req(str(i), [i] * 40)) for i in range(9)]
    assert 1 not in picks and set(picks) == {0, 2}
    r.set_available(1, True)
    picks = [r.route(req(f"b{i}", [100 + i] * 40)) for i in range(6)]
    assert 1 in picks


def test_no_replica_up_raises_and_charges_nothing() -> None:
    from tokenmill.core.router import NoReplicaError

    for name in ("round_robin", "least_outstanding_tokens", "prefix_aware"):
        r = make_router(name, 2)
        r.set_available(0, False)
        r.set_available(1, False)
        with pytest.raises(NoReplicaError):
            r.route(req("a", [1] * 20))
        assert r.outstanding_tokens == [0, 0] and r.outstanding_requests == [0, 0]


def test_prefix_aware_forgets_what_a_replica_held_when_it_goes_down() -> None:
    r = make_router("prefix_aware", 2, block_size=4)
    shared = list(range(100, 132))
    home = r.route(req("a", shared + [1]))
    r.on_finished(req("a", shared + [1]))
    r.set_available(home, False)
    assert r.route(req("b", shared + [2])) != home
    r.on_finished(req("b", shared + [2]))
    r.set_available(home, True)
    # Its cache was lost: the prefix now lives on the other replica only.
    assert r.route(req("c", shared + [3])) != home
