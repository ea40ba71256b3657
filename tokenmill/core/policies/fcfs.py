"""First come, first served: arrival order; the latest arrival is preempted first (vLLM's default)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenmill.core.policies.base import SchedulingPolicy, register_policy
from tokenmill.core.request import Request


@register_policy("fcfs")
class FCFSPolicy(SchedulingPolicy):
    def order_waiting(self, waiting: Sequence[Request], now: float, sched: object) -> Iterable[Request]:
        # The scheduler keeps its waiting queue in arrival order already.
        return waiting
