"""Virtual Token Counter: fair sharing of tokens served among clients.

Follows Sheng et al., "Fairness in Serving Large Language Models" (OSDI'24),
Algorithm 2. Each client (``Request.client_id``) has a counter of the service
it received: ``input_weight`` per prompt token, charged when a request is
admitted, and ``output_weight`` per generated token, charged as it is
generated. Whenever a request can be admitted, the earliest waiting request
of the waiting client with the smallest counter goes next; so admission is
work-conserving (a client alone gets everything) and, while several clients
are backlogged, the service gap between them stays bounded.

A client that becomes active again (a request arrives and it has none
waiting) has its counter lifted to the smallest counter among waiting
clients, or to the counter of the client that last left the queue when no
one waits, so that idling does not bank credit it could later use to
starve the others. Preemption takes the latest request of the running
client with the largest counter. Recomputing a preempted request is not
charged again: the client got no extra service from it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from tokenmill.core.policies.base import SchedulingPolicy, register_policy
from tokenmill.core.request import Request

if TYPE_CHECKING:
    from tokenmill.core.scheduler import Scheduler


@register_policy("vtc")
class VTCPolicy(SchedulingPolicy):
    def __init__(self, input_weight: float = 1.0, output_weight: float = 2.0) -> None:
        if input_weight < 0 or output_weight < 0:
            raise ValueError("token weights must be >= 0")
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.counters: dict[str, float] = defaultdict(float)
        self._waiting: dict[str, set[str]] = defaultdict(set)  # client -> waiting request ids
        self._charged: set[str] = set()  # requests whose prompt was charged
        self._last_left: str | None = None

    def _active(self) -> list[str]:
        return [c for c, ids in self._waiting.items() if ids]

    def on_arrival(self, req: Request, now: float) -> None:
        c = req.client_id
        if not self._waiting[c]:
            active = self._active()
            if active:
                floor = min(self.counters[a] for a in active)
            elif self._last_left is not None:
                floor = self.counters[self._last_left]
            else:
                floor = 0.0
            self.counters[c] = max(self.counters[c], floor)
        self._waiting[c].add(req.request_id)

    def order_waiting(self, waiting: Sequence[Request], now: float, sched: Scheduler) -> Iterator[Request]:
        # Per client, in arrival order (the scheduler's queue is arrival-ordered).
        queues: dict[str, list[Request]] = defaultdict(list)
        for r in waiting:
            queues[r.client_id].append(r)
        heads = {c: 0 for c in queues}
        while heads:
            # Lazily: on_admitted has charged the previous pick before we choose again.
            c = min(heads, key=lambda k: (self.counters[k], queues[k][heads[k]].seq_no))
            r = queues[c][heads[c]]
            heads[c] += 1
            if heads[c] == len(queues[c]):
                del heads[c]
            yield r

    def on_admitted(self, req: Request, now: float) -> None:
        c = req.client_id
        ids = self._waiting[c]
        ids.discard(req.request_id)
        if not ids:
            self._last_left = c
        if req.request_id not in self._charged:
            self._charged.add(req.request_id)
            self.counters[c] += self.input_weight * req.num_prompt_tokens

    def on_generated(self, req: Request, num_tokens: int, now: float) -> None:
        self.counters[req.client_id] += self.output_weight * num_tokens

    def choose_victim(self, candidates: Sequence[Request], now: float, sched: Scheduler) -> Request:
        victim = max(candidates, key=lambda r: (self.counters[r.client_id], r.arrival_time, r.seq_no))
        self._waiting[victim.client_id].add(victim.request_id)  # the scheduler requeues it
        return victim

    def on_finished(self, req: Request, now: float) -> None:
        self._waiting[req.client_id].discard(req.request_id)
        self._charged.discard(req.request_id)
