"""The seam between deciding and doing: a step plan, its result, and per-sequence updates.

``Scheduler.schedule(now) -> StepPlan``; an executor turns the plan into a
``StepResult`` (sampled tokens, or a simulated duration);
``Scheduler.update(plan, result) -> list[SeqUpdate]`` advances the requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.core.kv_eviction import KVEviction
from tokenmill.core.lora import LoRARequest
from tokenmill.core.request import FinishReason, Request, SamplingParams


@dataclass(slots=True)
class SeqSetup:
    """What an executor keeps about a sequence while it runs, sent once per admission.

    The scheduler attaches it to a sequence's ``ScheduledSeq`` in the plan that
    admits (or re-admits, after a preemption) the request; the executor keeps
    it until the request appears in a plan's ``finished_ids`` or
    ``preempted_ids``. ``output_token_ids`` are the tokens generated before
    this admission (repetition penalties and seeded streams need them); the
    executor appends what it samples itself.
    """

    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    sample_index: int = 0
    kv_eviction: KVEviction | None = None  # the executor evicts KV past this budget, after each sub-step
    lora: LoRARequest | None = None  # the adapter it runs with; the executor loads it if need be

    @property
    def wants_prompt_logprobs(self) -> bool:
        """True for a request that asked for its prompt's logprobs and has none sampled yet."""
        return self.sampling_params.prompt_logprobs is not None and not self.output_token_ids


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's share of a step: plain data, no live request.

    The first sub-step computes the KV of tokens ``[start_pos, start_pos +
    num_new_tokens)`` of the sequence (prompt, then output), which are
    ``token_ids``. If ``samples`` is true the last of them yields a sampled
    token; in a multi-step plan each later sub-step feeds the token sampled
    just before and samples one more, so a k-step plan computes
    ``num_new_tokens + k - 1`` tokens of KV and samples k tokens.

    The block table travels as a diff: the executor's copy of the request's
    table is replaced from index ``block_offset`` on by ``block_ids`` (the
    whole table, offset 0, at admission or after the prefix cache swapped a
    block; only the blocks appended since the last plan otherwise). The table
    then covers every token the plan writes.

    Speculative decoding (``core/spec.py``): a decode may carry
    ``draft_token_ids``, ``k`` tokens a proposer guessed after its last one.
    The step then also computes the KV of those ``k`` tokens (positions
    ``start_pos + num_new_tokens`` on) and the executor verifies them: it
    samples at each of the ``k + 1`` positions and returns the accepted
    drafts plus one token of the target's own (1 to ``k + 1`` tokens).
    ``num_propose`` asks the executor to propose that many drafts after this
    step, for the next one (``StepResult.draft_token_ids``); the table also
    covers the positions a draft model writes while it proposes them. A
    speculative step is always a single step (``num_steps == 1``).
    ``kv_offset`` is how many of the sequence's first ``start_pos`` tokens have
    been evicted (``kv_eviction.py``): its KV holds ``start_pos - kv_offset``
    entries, and the new tokens go to the entries after them. The table
    indexes entries, not positions; positions (RoPE) stay the tokens' own.
    """

    request_id: str
    start_pos: int
    num_new_tokens: int
    token_ids: list[int]
    block_offset: int
    block_ids: list[int]
    samples: bool
    setup: SeqSetup | None = None  # set in the plan that admits the request
    kv_offset: int = 0
    lora_id: int = 0  # its adapter's lora_int_id (0: base), for cost models that price LoRA
    draft_token_ids: list[int] = field(default_factory=list)
    num_propose: int = 0

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens whose KV the (first sub-)step computes: the new ones and the drafts."""
        return self.num_new_tokens + len(self.draft_token_ids)

    @property
    def is_prefill(self) -> bool:
        """True while the step still processes prompt (or recomputed) tokens."""
        return self.num_new_tokens > 1 or not self.samples


@dataclass(slots=True)
class StepPlan:
    """What one engine step (or ``num_steps`` decode steps) runs: a self-contained snapshot.

    An executor needs nothing else: sequences carry their tokens and block
    table diffs, newly admitted ones their ``SeqSetup``, and the ids of
    requests that finished or were aborted since the previous plan
    (``finished_ids``) or were preempted by this one (``preempted_ids``) tell
    it which per-request state to drop. So an executor may live in another
    process, and the simulator can price a plan without live requests.
    """

    step_id: int
    now: float
    seqs: list[ScheduledSeq]
    num_steps: int = 1  # > 1 only when every seq is a one-token decode and nothing can change
    preempted_ids: list[str] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)
    num_batched_tokens: int = 0  # tokens computed in the first sub-step (drafts included)
    num_waiting: int = 0
    num_running: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def summary(self) -> tuple:
        """A hashable digest of the decisions, for comparing engine and simulator runs."""
        return (
            self.num_steps,
            tuple((s.request_id, s.start_pos, s.num_new_tokens, s.samples, len(s.draft_token_ids))
                  for s in self.seqs),  # fmt: skip
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
    measured seconds the plan took. ``stop_strings[request_id] = (n, stop)``
    says that the request's ``n``-th token of this plan completed the stop
    string ``stop`` (found by whoever detokenizes, before ``update``): the
    request takes its first ``n`` tokens and finishes there.

    With speculative decoding, a sequence that verified ``k`` drafts has 1 to
    ``k + 1`` tokens in ``sampled_token_ids`` (its accepted drafts, then the
    target's token), and a logprob entry for each; ``draft_token_ids`` holds
    the drafts proposed for the next step (for sequences whose ``num_propose``
    asked), and ``draft_time`` the seconds of the plan spent proposing.
    """

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[LogprobEntry]] | None = None
    duration: float | None = None
    prompt_logprobs: dict[str, tuple[int, list[LogprobEntry]]] | None = None
    stop_strings: dict[str, tuple[int, str]] | None = None
    draft_token_ids: dict[str, list[int]] | None = None
    draft_time: float = 0.0
    # positions whose KV the executor evicted during the plan (requests with a KV budget)
    kv_evicted: dict[str, list[int]] | None = None


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


def standalone_seq(req: Request, start_pos: int, num_new_tokens: int, block_ids: list[int], samples: bool) -> ScheduledSeq:
    """A sequence for a plan built outside the scheduler (profiling, tests): it carries
    its setup and its whole table, so an executor takes it whatever it saw before."""
    setup = SeqSetup(req.prompt_token_ids, list(req.output_token_ids), req.sampling_params,
                     req.eos_token_ids, req.sample_index, kv_eviction=req.kv_eviction, lora=req.lora)  # fmt: skip
    tokens = req.token_ids_slice(start_pos, start_pos + num_new_tokens)
    return ScheduledSeq(req.request_id, start_pos, num_new_tokens, tokens, 0, list(block_ids), samples, setup,
                        lora_id=req.lora_id)  # fmt: skip
