"""Multi-bin batching: batches formed from one output-length bin at a time.

Follows Guldogan et al., "Multi-Bin Batching for Increasing LLM Inference
Throughput" (2024). Requests fall into bins by predicted output length
(``Request.predicted_output_len``, else ``max_tokens``; ``bin_edges`` are the
upper bounds of all bins but the last). A batch is up to ``batch_size``
admissions (default: the scheduler's ``max_num_seqs``) from a single bin;
when it is full, or its bin has nothing left waiting, the next batch takes
the bin whose oldest waiting request is oldest, so no bin starves.

With ``static=True`` a batch runs to completion before the next one is
admitted, the setting the paper analyses: a static batch lasts as long as
its longest request, so grouping similar lengths cuts the time the short
ones' slots sit idle. With ``static=False`` (continuous batching) requests
of the next batch join as slots free up, and the policy only clusters
admissions by bin.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from tokenmill.core.policies.base import SchedulingPolicy, register_policy
from tokenmill.core.request import Request

if TYPE_CHECKING:
    from tokenmill.core.scheduler import Scheduler


@register_policy("bins")
class MultiBinPolicy(SchedulingPolicy):
    def __init__(self, bin_edges: Sequence[int] = (64, 256), batch_size: int | None = None, static: bool = False) -> None:
        edges = [int(e) for e in bin_edges]
        if edges != sorted(set(edges)) or any(e < 1 for e in edges):
            raise ValueError(f"bin_edges must be increasing positive integers, got {list(bin_edges)}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.bin_edges = edges
        self.batch_size = batch_size
        self.static = static
        self.current_bin: int | None = None
        self.batch_admitted = 0  # admissions into the current batch

    def bin_of(self, req: Request) -> int:
        n = req.predicted_output_len
        if n is None:
            n = req.sampling_params.max_tokens
        if n is None:
            return len(self.bin_edges)
        return bisect.bisect_left(self.bin_edges, n)

    def order_waiting(self, waiting: Sequence[Request], now: float, sched: Scheduler) -> Iterator[Request]:
        queues: dict[int, list[Request]] = {}
        for r in waiting:  # arrival order
            queues.setdefault(self.bin_of(r), []).append(r)
        size = self.batch_size or sched.config.max_num_seqs
        if self.static:
            if not sched.running:
                self.current_bin = None  # the last static batch is done: form a new one
            elif any(r.num_output_tokens for r in sched.running):
                return  # a static batch that decodes takes no one
        while queues:
            if self.current_bin not in queues or self.batch_admitted >= size:
                if self.static and self.current_bin is not None:
                    return  # the static batch is full, or its bin ran dry
                self.current_bin = min(queues, key=lambda b: queues[b][0].seq_no)
                self.batch_admitted = 0
            q = queues[self.current_bin]
            r = q.pop(0)
            if not q:
                del queues[self.current_bin]
            yield r  # on_admitted counts it into the batch

    def on_admitted(self, req: Request, now: float) -> None:
        self.batch_admitted += 1
