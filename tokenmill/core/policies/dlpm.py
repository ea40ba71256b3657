"""Deficit longest prefix match: prefix locality with a per-client fairness bound.

Follows Cao et al., "Locality-aware Fair Scheduling in LLM Serving" (2025),
DLPM. Waiting requests are taken in LPM order (longest cached prefix first,
as in ``lpm``), but only from clients (``Request.client_id``) whose deficit
counter is positive. Admitting a request charges its client ``input_weight``
per prompt token; each generated token charges ``output_weight``. When every
waiting client is out of credit, each waiting client receives ``quantum``
(as many rounds as it takes for one of them to become eligible), as in
deficit round robin; so the policy is work-conserving, and a client can get
ahead of another by at most about one quantum plus one request, while within
that bound LPM keeps requests that share a cached prefix together.

As in deficit round robin, a client with nothing waiting does not bank
credit (a positive deficit is reset to zero), while its debt for tokens still
being generated is kept. Recomputing a preempted request is not charged
again. Preemption takes the latest request of the running client with the
smallest deficit. ``max_sort_len`` (the visible LPM cutoff) and
``in_batch_prefix_tokens`` (requests that would recompute a prefix being
computed in the same step wait a step) work as in ``lpm``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from tokenmill.core.policies.base import SchedulingPolicy, register_policy
from tokenmill.core.policies.lpm import InBatchPrefixCheck, lpm_order
from tokenmill.core.request import Request

if TYPE_CHECKING:
    from tokenmill.core.scheduler import Scheduler


@register_policy("dlpm")
class DLPMPolicy(SchedulingPolicy):
    def __init__(
        self,
        quantum: float = 1024.0,
        input_weight: float = 1.0,
        output_weight: float = 2.0,
        max_sort_len: int | None = None,
        in_batch_prefix_tokens: int | None = 32,
    ) -> None:
        if quantum <= 0:
            raise ValueError(f"quantum must be > 0, got {quantum}")
        if input_weight < 0 or output_weight < 0:
            raise ValueError("token weights must be >= 0")
        self.quantum = quantum
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.max_sort_len = max_sort_len
        self.in_batch = InBatchPrefixCheck(in_batch_prefix_tokens)
        self.deficits: dict[str, float] = defaultdict(float)
        self._charged: set[str] = set()

    def order_waiting(self, waiting: Sequence[Request], now: float, sched: Scheduler) -> Iterator[Request]:
        clients = {r.client_id for r in waiting}
        for c, d in self.deficits.items():
            if d > 0 and c not in clients:
                self.deficits[c] = 0.0  # no banked credit while idle
        remaining, hit = lpm_order(waiting, sched, self.max_sort_len)
        self.in_batch.new_step()
        while remaining:
            i = next((i for i, r in enumerate(remaining) if self.deficits[r.client_id] > 0), None)
            if i is None:
                # Every waiting client is out of credit: refill all of them by
                # the quantum, as many rounds as the least indebted one needs.
                waiting_clients = {r.client_id for r in remaining}
                rounds = min(int(-self.deficits[c] // self.quantum) + 1 for c in waiting_clients)
                for c in waiting_clients:
                    self.deficits[c] += rounds * self.quantum
                continue
            pick = remaining.pop(i)
            if self.in_batch.hold_back(pick, None if hit is None else hit[id(pick)]):
                continue  # its prefix is being computed in this step: it waits a step
            yield pick  # on_admitted charges the client before we pick again

    def on_admitted(self, req: Request, now: float) -> None:
        if req.request_id not in self._charged:
            self._charged.add(req.request_id)
            self.deficits[req.client_id] -= self.input_weight * req.num_prompt_tokens

    def on_generated(self, req: Request, num_tokens: int, now: float) -> None:
        self.deficits[req.client_id] -= self.output_weight * num_tokens

    def choose_victim(self, candidates: Sequence[Request], now: float, sched: Scheduler) -> Request:
        return max(candidates, key=lambda r: (-self.deficits[r.client_id], r.arrival_time, r.seq_no))

    def on_finished(self, req: Request, now: float) -> None:
        self._charged.discard(req.request_id)
