"""Longest prefix match first: waiting requests with more cached prompt go first.

Follows SGLang's LPM policy (Zheng et al., "SGLang: Efficient Execution of
Structured Language Model Programs", NeurIPS 2024): admitting the requests
whose prompts the radix cache already holds reuses KV before it is evicted,
which raises the token hit rate when the cache cannot hold every prefix.
Ties keep arrival order.

Grouping requests by prefix has a trap: when the shared prefix is not cached
yet, LPM would admit the whole group in one step and every member would
compute the same prefix. As SGLang's in-batch prefix check does, a request
whose next ``in_batch_prefix_tokens`` uncached tokens equal those of a
request already admitted in this step is held back for a step, by which
time the first one's prefix is in the cache (SGLang only moves such
requests to the back; here they wait, so the prefix is computed once).
``None`` turns the check off.

SGLang silently falls back to FCFS past 128 waiting requests to bound the
cost of matching every prompt each step; here that cutoff is the visible
``max_sort_len`` option (``None``: always sort). Past it, neither sorting
nor the in-batch check happens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from tokenmill.core.policies.base import SchedulingPolicy, register_policy
from tokenmill.core.request import Request

if TYPE_CHECKING:
    from tokenmill.core.scheduler import Scheduler


def lpm_order(
    waiting: Sequence[Request], sched: Scheduler, max_sort_len: int | None
) -> tuple[list[Request], dict[int, int] | None]:
    """``waiting`` by cached prefix length, longest first, then arrival, with the lengths by ``id``.

    Past ``max_sort_len`` waiting requests: arrival order (the scheduler's own) and no lengths.
    """
    if max_sort_len is not None and len(waiting) > max_sort_len:
        return list(waiting), None
    hit = {id(r): sched.prefix_match_tokens(r) for r in waiting}
    return sorted(waiting, key=lambda r: (-hit[id(r)], r.arrival_time, r.seq_no)), hit


class InBatchPrefixCheck:
    """Holds back requests that would compute the same uncached tokens as one admitted in this step."""

    def __init__(self, tokens: int | None) -> None:
        if tokens is not None and tokens < 1:
            raise ValueError(f"in_batch_prefix_tokens must be >= 1 or None, got {tokens}")
        self.tokens = tokens
        self._taken: set[tuple] = set()

    def new_step(self) -> None:
        self._taken.clear()

    def _key(self, req: Request, hit: int) -> tuple | None:
        # Two requests share at least ``tokens`` uncached tokens after the same
        # cached prefix exactly when these keys are equal.
        if self.tokens is None or req.num_tokens < hit + self.tokens:
            return None
        return (req.cache_namespace, hit, tuple(req.token_ids_slice(0, hit + self.tokens)))

    def hold_back(self, req: Request, hit: int | None) -> bool:
        """True if ``req`` should wait a step; otherwise count it as taken by this step."""
        if hit is None:
            return False
        key = self._key(req, hit)
        if key is None:
            return False
        if key in self._taken:
            return True
        self._taken.add(key)
        return False


@register_policy("lpm")
class LPMPolicy(SchedulingPolicy):
    def __init__(self, max_sort_len: int | None = None, in_batch_prefix_tokens: int | None = 32) -> None:
        if max_sort_len is not None and max_sort_len < 0:
            raise ValueError(f"max_sort_len must be >= 0 or None, got {max_sort_len}")
        self.max_sort_len = max_sort_len
        self.in_batch = InBatchPrefixCheck(in_batch_prefix_tokens)

    def order_waiting(self, waiting: Sequence[Request], now: float, sched: Scheduler) -> Iterator[Request]:
        order, hit = lpm_order(waiting, sched, self.max_sort_len)
        self.in_batch.new_step()
        for r in order:
            # A request is yielded once it passes the check; if the scheduler then
            # cannot admit it, it stops asking, so counting it as taken is safe.
            if not self.in_batch.hold_back(r, None if hit is None else hit[id(r)]):
                yield r
