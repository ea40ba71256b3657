"""The executor's side of structured output: one grammar matcher per sequence, a bitmask per step.

The matcher lives with the executor's per-request state (``SeqView.grammar``),
because a multi-step plan samples several tokens inside the executor and each
needs the mask of the state its predecessor left. It is built when a plan
admits the request, from the compiled grammar the ``SeqSetup`` carries, and
fed the request's earlier output tokens: after a preemption by recompute
those are exactly the tokens ``Scheduler.update`` accepted, so the matcher
resumes where the request stood. It then advances on every token the
executor samples for the request. Tokens sampled past a stop (a stop string
found later, EOS in an earlier sub-step) go to a request that is finished and
forgotten with the next plan, so they never matter.

``StepMasks`` fills one packed int32 bitmask row per constrained sampling row
(xgrammar's layout; the sampler applies it inside its fused kernel) and
accepts the sampled tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tokenmill.core.plan import SeqSetup


class SequenceGrammar:
    """One sequence's grammar matcher."""

    __slots__ = ("matcher", "num_tokens")

    def __init__(self, compiled: Any, stop_token_ids: Sequence[int], outputs: Sequence[int]) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_token_ids) or None)
        self.num_tokens = 0
        for t in outputs:
            if not self.accept(t):
                raise ValueError(f"output token {t} (position {self.num_tokens}) does not fit the grammar")

    @classmethod
    def for_setup(cls, setup: SeqSetup) -> SequenceGrammar | None:
        """The matcher of an admitted sequence, or None if it has no structured output."""
        so = setup.sampling_params.structured_outputs
        if so is None:
            return None
        if so.compiled is None:
            raise ValueError("structured_outputs reached the executor uncompiled (Engine.add_request compiles it)")
        sp = setup.sampling_params
        stops = [*setup.eos_token_ids, *(sp.stop_token_ids or [])]
        return cls(so.compiled, sorted(set(stops)), setup.output_token_ids)

    @property
    def terminated(self) -> bool:
        """True once it accepted a stop token: nothing follows."""
        return self.matcher.is_terminated()

    def accept(self, token: int) -> bool:
        """Advance on ``token``; False (state unchanged) if the grammar does not allow it."""
        if self.matcher.is_terminated():
            return False
        ok = self.matcher.accept_token(token)
        if ok:
            self.num_tokens += 1
        return ok

    def fill(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write the allowed next tokens into ``bitmask[row]``; False (row left as it is)
        once terminated."""
        if self.matcher.is_terminated():
            return False
        self.matcher.fill_next_token_bitmask(bitmask, row)
        return True


class StepMasks:
    """Token bitmasks for the sampling rows of a plan's sub-steps (one buffer, reused)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._buffer = torch.empty((0, self.words), dtype=torch.int32)

    @staticmethod
    def admit(seqs: Sequence[Any], views: Sequence[Any]) -> None:
        """Give each sequence a plan admits its matcher (``seqs``: the plan's, ``views``: theirs)."""
        for s, v in zip(seqs, views, strict=True):
            if s.setup is not None:
                v.grammar = SequenceGrammar.for_setup(s.setup)

    def fill(self, grammars: Sequence[SequenceGrammar | None]) -> tuple[torch.Tensor | None, list[bool]]:
        """The bitmask of one sub-step (None if no row is constrained) and which rows are."""
        n = len(grammars)
        if self._buffer.shape[0] < n:
            self._buffer = torch.empty((max(n, 2 * self._buffer.shape[0]), self.words), dtype=torch.int32)
        mask = self._buffer[:n]
        constrained = [False] * n
        for i, g in enumerate(grammars):
            if g is not None and g.fill(mask, i):
                constrained[i] = True
        if not any(constrained):
            return None, constrained
        return mask, constrained

    @staticmethod
    def accept(grammars: Sequence[SequenceGrammar | None], tokens: Sequence[int]) -> None:
        for g, t in zip(grammars, tokens, strict=True):
            if g is not None:
                g.accept(t)
