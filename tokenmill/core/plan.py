"""The seam between deciding and doing: a step plan, its result, and per-sequence updates.

``Scheduler.schedule(now) -> StepPlan``; an executor turns the plan into a
``StepResult`` (sampled tokens, or a simulated duration);
``Scheduler.update(plan, result) -> list[SeqUpdate]`` advances the requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.core.request import FinishReason, Request


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's share of a step.

    The first sub-step computes the KV of tokens
    ``[start_pos, start_pos + num_new_tokens)`` of ``request.all_token_ids``.
    If ``samples`` is true the last of them yields a sampled token; in a
    multi-step plan each later sub-step feeds the token sampled just before
    and samples one more, so a k-step plan computes ``num_new_tokens + k - 1``
    tokens of KV and samples k tokens.
    """

    request: Request
    start_pos: int
    num_new_tokens: int
    block_ids: list[int]  # the request's whole block table (read-only for executors)
    samples: bool

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def is_prefill(self) -> bool:
        """True while the step still processes prompt (or recomputed) tokens."""
        return self.num_new_tokens > 1 or not self.samples

    def new_token_ids(self) -> list[int]:
        return self.request.token_ids_slice(self.start_pos, self.start_pos + self.num_new_tokens)


@dataclass(slots=True)
class StepPlan:
    """What one engine step (or ``num_steps`` decode steps) runs."""

    step_id: int
    now: float
    seqs: list[ScheduledSeq]
    num_steps: int = 1  # > 1 only when every seq is a one-token decode and nothing can change
    preempted_ids: list[str] = field(default_factory=list)
    num_batched_tokens: int = 0  # tokens computed in the first sub-step
    num_waiting: int = 0
    num_running: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def summary(self) -> tuple:
        """A hashable digest of the decisions, for comparing engine and simulator runs."""
        return (
            self.num_steps,
            tuple((s.request_id, s.start_pos, s.num_new_tokens, s.samples) for s in self.seqs),
            tuple(self.preempted_ids),
        )


# (logprob of a token, [(token_id, logprob), ...top-N])
LogprobEntry = tuple[float, list[tuple[int, float]]]


@dataclass(slots=True)
class StepResult:
    """What an executor returns for a plan.

    ``sampled_token_ids[request_id]`` holds one token per sub-step for each
    sampling sequence. ``logprobs[request_id]`` (when asked for) holds a
    ``LogprobEntry`` per sampled token. ``prompt_logprobs[request_id]`` (for
    requests that want them, see ``Request.wants_prompt_logprobs``) is
    ``(j, entries)``: the entries of prompt tokens ``j, j + 1, ...`` whose
    predicting position the step computed. ``duration`` is the simulated or
    measured seconds the plan took.
    """

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[LogprobEntry]] | None = None
    duration: float | None = None
    prompt_logprobs: dict[str, tuple[int, list[LogprobEntry]]] | None = None


@dataclass(slots=True)
class SeqUpdate:
    """What changed for one sequence in ``update``: returned as data to the engine."""

    request: Request
    new_token_ids: list[int]
    new_logprobs: list[LogprobEntry] | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id that finished it, if one did
    prompt_logprobs: tuple[int, list[LogprobEntry]] | None = None  # as in StepResult

    @property
    def request_id(self) -> str:
        return self.request.request_id
