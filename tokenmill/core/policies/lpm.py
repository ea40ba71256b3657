"""Longest prefix match first: waiting requests with more cached prompt go first.

Follows SGLang's LPM policy (Zheng et al., "SGLang: Efficient Execution of
Structured Language Model Programs", NeurIPS 2024): admitting the requests
whose prompts the radix cache already holds reuses KV before it is evicted,
which raises the token hit rate when the cache cannot hold every prefix.
Ties keep arrival order. SGLang silently falls back to FCFS past 128 waiting
requests to bound the cost of matching every prompt each step; here that
cutoff is the visible ``max_sort_len`` option (``None``: always sort).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from tokenmill.core.policies.base import SchedulingPolicy, register_policy
from tokenmill.core.request import Request

if TYPE_CHECKING:
    from tokenmill.core.scheduler import Scheduler


def lpm_order(waiting: Sequence[Request], sched: Scheduler, max_sort_len: int | None) -> list[Request]:
    """``waiting`` by cached prefix length, longest first, then arrival; FCFS past ``max_sort_len``."""
    if max_sort_len is not None and len(waiting) > max_sort_len:
        return list(waiting)  # the scheduler keeps its queue in arrival order
    hit = {id(r): sched.prefix_match_tokens(r) for r in waiting}
    return sorted(waiting, key=lambda r: (-hit[id(r)], r.arrival_time, r.seq_no))


@register_policy("lpm")
class LPMPolicy(SchedulingPolicy):
    def __init__(self, max_sort_len: int | None = None) -> None:
        if max_sort_len is not None and max_sort_len < 0:
            raise ValueError(f"max_sort_len must be >= 0 or None, got {max_sort_len}")
        self.max_sort_len = max_sort_len

    def order_waiting(self, waiting: Sequence[Request], now: float, sched: Scheduler) -> Iterable[Request]:
        return lpm_order(waiting, sched, self.max_sort_len)
