"""Speculative decoding in the core: how many draft tokens each request verifies, and what came of it.

A proposer (``tokenmill/spec/``, in the executor) guesses the next tokens of
a request; the target model then checks ``k`` of them in one forward pass of
``k + 1`` tokens, which reads the weights once: at small batch, decode is
bound by memory bandwidth, so the extra tokens are nearly free and every
accepted draft is a token won (Leviathan et al., "Fast Inference from
Transformers via Speculative Decoding", 2023; Chen et al., 2023).

The draft length is chosen per request and per step (``SpecController.plan``):

- **per request** from an acceptance estimate: ``alpha_r``, the chance that a
  draft token is accepted, kept per request as decayed counts of accepted and
  rejected drafts with the engine-wide rate as prior (adaptive draft length, as
  in PEARL, Liu et al. 2024, and DISCO / SpecDec++: the length follows how well
  the drafts are doing rather than a constant);
- **per step** from the batch: a step of ``T`` tokens costs
  ``max(1, T / knee_tokens)`` target decode steps (flat while the weights'
  bytes dominate, linear once the step is compute bound) plus
  ``draft_cost`` per draft step; draft tokens are added, best expected gain
  first (the ``j``-th draft of request ``r`` adds ``alpha_r ** j`` expected
  tokens), only while they raise expected tokens per unit of cost. This is
  the goodput rule of SmartSpec (Liu et al., "Optimizing Speculative Decoding
  for Serving Large Language Models Using Goodput", 2024) with AdaServe's
  per-request view of acceptance: at batch 1 it picks the ``k`` that
  maximises ``E[tokens](k) / (1 + k draft_cost)``; once the decode batch
  alone fills ``knee_tokens``, no draft can pay and speculation backs off.

``num_speculative_tokens`` fixed (``adaptive=False``) drafts exactly that many
tokens for every decode, whatever the batch (useful to measure and to test).
Everything here is plain data and arithmetic: no clock, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

# Decay of a request's acceptance counts per verification: recent steps weigh more,
# so the estimate follows a request whose text turns predictable (or stops being so).
_REQUEST_DECAY = 0.8
_GLOBAL_DECAY = 0.995
# Pseudo-observations of the engine-wide rate that a request's estimate starts from.
_PRIOR_WEIGHT = 2.0
_ALPHA_RANGE = (0.02, 0.98)


@dataclass
class SpecConfig:
    """Speculative decoding as the scheduler sees it (the proposer itself lives in the executor)."""

    num_speculative_tokens: int = 0  # the most draft tokens per request and step; 0: off
    adaptive: bool = True  # choose k per request and step (see the module docstring); False: always k
    # One draft step's cost relative to one target decode step (the executor's estimate:
    # the draft's weight bytes over the target's; about 0 for prompt lookup).
    draft_cost: float = 0.0
    # Tokens per step up to which a target step costs about as much as one decode
    # (memory bound); past it, cost grows with the tokens (compute bound).
    knee_tokens: int = 16
    initial_acceptance: float = 0.7  # the engine-wide rate before anything was verified

    def __post_init__(self) -> None:
        if self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 1 (or 0: off), got {self.num_speculative_tokens}")
        if self.draft_cost < 0:
            raise ValueError(f"draft_cost must be >= 0, got {self.draft_cost}")
        if self.knee_tokens < 1:
            raise ValueError(f"knee_tokens must be >= 1, got {self.knee_tokens}")
        if not 0.0 < self.initial_acceptance < 1.0:
            raise ValueError(f"initial_acceptance must be in (0, 1), got {self.initial_acceptance}")

    @property
    def enabled(self) -> bool:
        return self.num_speculative_tokens > 0


@dataclass
class SpecStats:
    """Counters of verified drafts (engine stats, Prometheus, the twin's reports)."""

    num_drafts: int = 0  # verifications: sequences that had draft tokens checked
    num_draft_tokens: int = 0  # draft tokens checked
    num_accepted_tokens: int = 0  # draft tokens accepted

    @property
    def acceptance_rate(self) -> float:
        """Accepted over checked draft tokens."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens gained per verification: the accepted drafts plus the target's own token."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class SpecController:
    """Draft lengths per request and step, from acceptance estimates and the step's cost model."""

    def __init__(self, config: SpecConfig) -> None:
        self.config = config
        self.stats = SpecStats()
        self._acc: dict[str, tuple[float, float]] = {}  # request id -> (accepted, trials), decayed
        g = config.initial_acceptance
        self._global = (g * _PRIOR_WEIGHT * 10, _PRIOR_WEIGHT * 10)

    # -- estimates --------------------------------------------------------------------

    def acceptance(self, request_id: str) -> float:
        """The request's estimated chance that a draft token is accepted."""
        ga, gt = self._global
        g = ga / gt
        a, t = self._acc.get(request_id, (0.0, 0.0))
        lo, hi = _ALPHA_RANGE
        return min(hi, max(lo, (a + _PRIOR_WEIGHT * g) / (t + _PRIOR_WEIGHT)))

    def observe(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        """``num_accepted`` of the request's ``num_drafts`` draft tokens were accepted."""
        if num_drafts <= 0:
            return
        s = self.stats
        s.num_drafts += 1
        s.num_draft_tokens += num_drafts
        s.num_accepted_tokens += num_accepted
        # Accepted drafts are successes; the first rejected one (if any) is a failure;
        # drafts after it were never tried.
        trials = num_accepted + (1 if num_accepted < num_drafts else 0)
        a, t = self._acc.get(request_id, (0.0, 0.0))
        self._acc[request_id] = (a * _REQUEST_DECAY + num_accepted, t * _REQUEST_DECAY + trials)
        ga, gt = self._global
        self._global = (ga * _GLOBAL_DECAY + num_accepted, gt * _GLOBAL_DECAY + trials)

    def forget(self, request_id: str) -> None:
        self._acc.pop(request_id, None)

    # -- the plan ---------------------------------------------------------------------

    def plan(self, request_ids: list[str]) -> list[int]:
        """Draft length for each of the step's decoding requests (same order)."""
        cfg = self.config
        kmax = cfg.num_speculative_tokens
        n = len(request_ids)
        if kmax <= 0 or n == 0:
            return [0] * n
        if not cfg.adaptive:
            return [kmax] * n
        alphas = [self.acceptance(r) for r in request_ids]
        order = sorted(range(n), key=lambda i: -alphas[i])
        knee, rho = float(cfg.knee_tokens), cfg.draft_cost
        lengths = [0] * n
        tokens = float(n)  # expected tokens of the step: one per request before any draft
        fed = n  # tokens the target computes
        best = tokens / max(1.0, fed / knee)
        gains = [1.0] * n  # alpha_r ** j for the level being filled
        for level in range(1, kmax + 1):
            # Add the level-th draft to the m most promising requests; take the best m.
            best_m, best_rate = 0, best
            t, f = tokens, fed
            for m, i in enumerate(order, start=1):
                t += gains[i] * alphas[i]
                f += 1
                rate = t / (max(1.0, f / knee) + rho * level)
                if rate > best_rate:
                    best_m, best_rate = m, rate
            if best_m == 0:
                break
            for i in order[:best_m]:
                gains[i] *= alphas[i]
                tokens += gains[i]
                lengths[i] = level
            fed += best_m
            best = best_rate
            order = order[:best_m]  # a request that stopped short gains less at the next level
        return lengths
