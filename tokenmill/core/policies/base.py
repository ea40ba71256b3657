"""The scheduling-policy plug-in point.

A policy orders the waiting queue, picks preemption victims, may veto an
admission, and sees accounting events (arrivals, tokens computed, tokens
generated, finishes) so that stateful policies (fair-share counters,
deadlines) can keep their books. Policies never touch blocks: the scheduler
and the KV manager do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from tokenmill.core.request import Request

if TYPE_CHECKING:
    from tokenmill.core.scheduler import Scheduler


class SchedulingPolicy:
    """Base policy: order by ``key`` (smallest first), preempt the largest key."""

    name = "base"

    def __init__(self, **options: Any) -> None:
        if options:
            raise ValueError(f"policy {self.name!r} takes no options, got {sorted(options)}")

    def key(self, req: Request, now: float, sched: Scheduler) -> Any:
        return (req.arrival_time, req.seq_no)

    def order_waiting(self, waiting: Sequence[Request], now: float, sched: Scheduler) -> Iterable[Request]:
        return sorted(waiting, key=lambda r: self.key(r, now, sched))

    def choose_victim(self, candidates: Sequence[Request], now: float, sched: Scheduler) -> Request:
        return max(candidates, key=lambda r: self.key(r, now, sched))

    def may_admit(self, req: Request, now: float, sched: Scheduler) -> bool:
        """Return False to skip this request in this step (the scheduler goes on to the next)."""
        return True

    # Accounting hooks: default no-ops.
    def on_arrival(self, req: Request, now: float) -> None:
        pass

    def on_admitted(self, req: Request, now: float) -> None:
        """The request was just admitted (or re-admitted after preemption).

        Called inside ``schedule`` before the next waiting request is
        considered, so a lazily ordered ``order_waiting`` (a generator) sees
        the effect of each admission on its books within the same step.
        """

    def on_computed(self, req: Request, num_tokens: int, now: float) -> None:
        """``num_tokens`` of the request's prompt (or recompute) were scheduled this step."""

    def on_generated(self, req: Request, num_tokens: int, now: float) -> None:
        pass

    def on_finished(self, req: Request, now: float) -> None:
        pass


_REGISTRY: dict[str, type[SchedulingPolicy]] = {}


def register_policy(name: str) -> Callable[[type[SchedulingPolicy]], type[SchedulingPolicy]]:
    def wrap(cls: type[SchedulingPolicy]) -> type[SchedulingPolicy]:
        if name in _REGISTRY:
            raise ValueError(f"policy {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def make_policy(name: str, **options: Any) -> SchedulingPolicy:
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown scheduling policy {name!r}; available: {', '.join(available_policies())}") from None
    return cls(**options)
