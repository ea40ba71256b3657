"""SLO-aware scheduling: least slack first, with relegation of hopeless requests.

Follows Niyama (Goel et al., "Niyama: Breaking the Silos of LLM Inference
Serving", 2025): requests carry latency deadlines (``Request.ttft_slo`` and
``tpot_slo`` in seconds, or per-class defaults looked up by
``Request.priority``); waiting requests are ordered by slack, the time left
before their deadline minus the time they still need; and, under overload,
a request whose deadline can no longer be met is relegated to best effort
for good, instead of being served late at the expense of requests that can
still make it (under plain deadline order one late request makes the next
ones late too, and everyone misses).

Deadlines: before the first token, ``arrival_time + ttft``; after it (a
request preempted or running), the next token's deadline under the TPOT
target, ``first_token_time + tpot * num_output_tokens``. The time a waiting
request still needs is its remaining prompt over ``prefill_tokens_per_s``
(``None``: only the deadline itself counts). Best effort (no SLO, or
relegated) comes after every request with a live deadline, in priority then
arrival order; preemption takes best effort first, then the most slack.
``relegate=False`` gives plain least-slack-first, for comparison.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tokenmill.core.policies.base import SchedulingPolicy, register_policy
from tokenmill.core.request import Request

if TYPE_CHECKING:
    from tokenmill.core.scheduler import Scheduler


@register_policy("slo")
class SLOPolicy(SchedulingPolicy):
    def __init__(
        self,
        ttft_slo_by_priority: Mapping[int, float] | None = None,
        tpot_slo_by_priority: Mapping[int, float] | None = None,
        prefill_tokens_per_s: float | None = None,
        relegate: bool = True,
    ) -> None:
        if prefill_tokens_per_s is not None and prefill_tokens_per_s <= 0:
            raise ValueError(f"prefill_tokens_per_s must be > 0 or None, got {prefill_tokens_per_s}")
        # JSON (CLI, config files) gives string keys: accept them.
        self.ttft_by_prio = {int(k): float(v) for k, v in (ttft_slo_by_priority or {}).items()}
        self.tpot_by_prio = {int(k): float(v) for k, v in (tpot_slo_by_priority or {}).items()}
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.relegate = relegate
        self.relegated: set[str] = set()

    def slos(self, req: Request) -> tuple[float | None, float | None]:
        ttft = req.ttft_slo if req.ttft_slo is not None else self.ttft_by_prio.get(req.priority)
        tpot = req.tpot_slo if req.tpot_slo is not None else self.tpot_by_prio.get(req.priority)
        return ttft, tpot

    def deadline(self, req: Request) -> float | None:
        ttft, tpot = self.slos(req)
        if req.first_token_time is None:
            return None if ttft is None else req.arrival_time + ttft
        if tpot is None:
            return None
        return req.first_token_time + tpot * req.num_output_tokens

    def slack(self, req: Request, now: float) -> float | None:
        dl = self.deadline(req)
        if dl is None:
            return None
        need = 0.0
        if self.prefill_tokens_per_s is not None and req.first_token_time is None:
            need = (req.num_tokens - req.num_computed_tokens) / self.prefill_tokens_per_s
        return dl - now - need

    def key(self, req: Request, now: float, sched: Scheduler) -> Any:
        if req.request_id not in self.relegated:
            s = self.slack(req, now)
            if s is not None:
                if s >= 0 or not self.relegate:
                    return (0, s, req.seq_no)
                self.relegated.add(req.request_id)  # for good: it cannot recover its deadline
        return (1, req.priority, req.arrival_time, req.seq_no)

    def on_finished(self, req: Request, now: float) -> None:
        self.relegated.discard(req.request_id)
