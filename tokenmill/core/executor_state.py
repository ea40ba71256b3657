"""What an executor knows of the running requests, rebuilt from plans alone.

Plans are snapshots (``plan.py``): a sequence's ``SeqSetup`` arrives in the plan
that admits it, its block table as diffs, and the ids of requests that
finished or were preempted tell the executor what to forget. ``ExecutorState``
applies those rules once for every executor (the model executor, a remote
worker, test fakes), so none of them reads a live ``Request``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenmill.core.plan import SeqSetup, StepPlan


@dataclass(slots=True)
class SeqView:
    """One running request as its executor sees it."""

    setup: SeqSetup
    outputs: list[int]  # output tokens: those before its admission, then what was sampled since
    blocks: list[int] = field(default_factory=list)  # its block table
    # its structured-output matcher (tokenmill/structured/decoding.py), kept by the executor
    grammar: Any = None

    def token_ids(self) -> list[int]:
        """Prompt and output tokens."""
        return self.setup.prompt_token_ids + self.outputs


class ExecutorState:
    def __init__(self) -> None:
        self.seqs: dict[str, SeqView] = {}

    def __len__(self) -> int:
        return len(self.seqs)

    def apply(self, plan: StepPlan) -> list[SeqView]:
        """Apply the plan's bookkeeping; return the view of each of its sequences, in order."""
        seqs = self.seqs
        for rid in plan.finished_ids:
            seqs.pop(rid, None)
        for rid in plan.preempted_ids:
            seqs.pop(rid, None)
        views = []
        for s in plan.seqs:
            if s.setup is not None:
                v = seqs[s.request_id] = SeqView(s.setup, list(s.setup.output_token_ids))
            else:
                v = seqs[s.request_id]
            if s.block_ids or s.block_offset < len(v.blocks):
                v.blocks[s.block_offset :] = s.block_ids
            views.append(v)
        return views

    def record(self, sampled: dict[str, list[int]]) -> None:
        """Append what the plan sampled to each request's outputs.

        Tokens past a stop are appended too: that request is finished, and it
        is forgotten with the next plan's ``finished_ids`` before anyone reads it.
        """
        seqs = self.seqs
        for rid, toks in sampled.items():
            seqs[rid].outputs.extend(toks)
