"""Continuous batching with one token budget per step.

Each ``schedule(now)`` first tops up the running requests (decodes and
unfinished prefill chunks, in admission order), preempting by recompute when
blocks run out (the policy picks the victim), then admits waiting requests
in policy order while the token budget, the running cap and the blocks allow,
matching each prompt against the prefix cache. One step therefore mixes
prefill and decode; long prompts are chunked. When every scheduled sequence
is a one-token decode and no admission can happen, a plan covers several
decode steps at once. ``update(plan, result)`` appends sampled tokens, checks
stop conditions and frees or caches blocks.

Speculative decoding (``core/spec.py``): a decode that holds draft tokens
verifies up to ``k`` of them, ``k`` chosen by the ``SpecController`` per
request and step; they count against the token budget and their KV slots are
reserved (drafts are the first thing dropped when blocks run short, before
anyone is preempted). A sequence that samples may also be asked to propose
drafts for the next step; the slots a draft model writes while proposing are
reserved from what is left after admissions. ``update`` takes the accepted
drafts through the same stop rules as any sampled token, keeps the new
proposals, and gives back (``KVManager.trim``) the blocks reserved past them.
A speculative step is a single step.

Fan-out share: the ``n`` samples of one user request (core requests with one
``parent_id``) may hold every free running slot while nobody else waits, but
beyond ``max_seqs_per_request`` slots they give way to other requests,
whatever the policy: while a request of another parent that may be admitted
waits, the samples past the cap are not admitted ahead of it, and when the
running set is full, ``schedule`` preempts (by recompute; full blocks stay
cached) as many samples past the cap as such requests need slots. When
blocks run short, samples past their parent's cap are the first victims.
So a request arriving behind a fan-out is admitted at the first ``schedule``
after it arrives (blocks and token budget permitting): its first token comes
after at most the plan in flight (``max_decode_steps`` steps) and its own
prefill chunks, instead of ``n / max_num_seqs`` rounds of ``max_tokens``
decodes.

LoRA adapters: at most ``max_loras`` distinct adapters run at once (the
executor keeps that many resident). A waiting request whose adapter would be
one too many is passed over, not blocking the requests behind it, until one
of the running adapters has no request left (S-LoRA / vLLM do the same).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, cast

from tokenmill.core.kv_manager import KVManager
from tokenmill.core.plan import ScheduledSeq, SeqSetup, SeqUpdate, StepPlan, StepResult
from tokenmill.core.policies import SchedulingPolicy, make_policy
from tokenmill.core.request import FinishReason, Request, RequestStatus
from tokenmill.core.spec import SpecConfig, SpecController
from tokenmill.core.timeline import Timeline

_NONE: list[int] = cast(list[int], ())  # the tokens and blocks of a lean plan's sequences: none


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_waiting``; the caller should retry later."""


@dataclass
class SchedulerConfig:
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_decode_steps: int = 1  # > 1 lets one plan cover several decode steps
    max_waiting: int | None = None  # bound on the waiting queue; None: unbounded
    # Running slots the samples of one user request keep while requests of other
    # parents wait for one (see the module docstring); None: no share, plain policy order.
    max_seqs_per_request: int | None = 8
    # Distinct LoRA adapters among the running requests (None: no bound).
    max_loras: int | None = None
    policy: str = "fcfs"
    policy_options: dict[str, Any] = field(default_factory=dict)
    debug_checks: bool = False  # check block invariants after every schedule and update
    # Speculative decoding (core/spec.py): the most draft tokens a decode verifies per
    # step (0: off); chosen per request and step when adaptive, else always that many.
    num_speculative_tokens: int = 0
    speculative_adaptive: bool = True
    speculative_draft_cost: float = 0.0  # one draft step over one target decode step
    speculative_knee_tokens: int = 16  # tokens per step past which a step is compute bound

    def spec_config(self) -> SpecConfig:
        return SpecConfig(self.num_speculative_tokens, self.speculative_adaptive,
                          self.speculative_draft_cost, self.speculative_knee_tokens)  # fmt: skip
    # The longest sliding window of a model all of whose layers have one: blocks every layer's
    # window has passed are given back (KVManager.free_outside_window). None: keep every block.
    kv_window: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.max_decode_steps < 1:
            raise ValueError("max_decode_steps must be >= 1")
        self.spec_config()  # validates the speculative decoding fields
        if self.kv_window is not None and self.kv_window < 1:
            raise ValueError(f"kv_window must be >= 1 or None, got {self.kv_window}")
        if self.max_loras is not None and self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1 or None, got {self.max_loras}")
        if self.max_seqs_per_request is not None and self.max_seqs_per_request < 1:
            raise ValueError(f"max_seqs_per_request must be >= 1 or None, got {self.max_seqs_per_request}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "without chunked prefill, max_num_batched_tokens must be >= max_model_len "
                f"({self.max_num_batched_tokens} < {self.max_model_len})"
            )


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_blocks: int
    num_used_blocks: int
    num_cached_blocks: int
    kv_usage: float
    num_preemptions: int
    prefix_query_tokens: int
    prefix_hit_tokens: int
    num_evicted_blocks: int


class Scheduler:
    def __init__(self, config: SchedulerConfig, policy: SchedulingPolicy | None = None, *, lean_plans: bool = False) -> None:
        self.config = config
        # Lean plans carry positions only (no tokens, block-table diffs or setups): for an
        # executor that prices a plan without running it (the twin's), which reads nothing else.
        self.lean_plans = lean_plans
        self.kv = KVManager(config.num_blocks, config.block_size, config.enable_prefix_caching, config.kv_window)
        self.policy = policy or make_policy(config.policy, **config.policy_options)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []  # arrival order: (arrival_time, seq_no)
        self.running: list[Request] = []  # admission order
        self._seq = 0
        self._step = 0
        self.num_preemptions = 0
        self._held: dict[str, int] = {}  # parent -> its running samples (parents with more than one)
        # The last plan's live requests, in its seq order: plans carry ids only, and
        # ``update``/``shorten_plan`` take the plan that ``schedule`` returned last.
        self._plan_step = 0
        self._plan_requests: list[Request] = []
        self._finished_ids: list[str] = []  # finished or aborted since the last plan
        self._over: set[str] = set()  # parents holding more than max_seqs_per_request slots
        self.spec = SpecController(config.spec_config())
        # Set by whoever wants request timelines (engine or twin): told of arrivals, plans, finishes.
        self.timeline: Timeline | None = None
        self._loras: dict[int, int] = {}  # adapter id -> its running requests

    # ---------------------------------------------------------------- inputs

    def add_request(self, req: Request, now: float | None = None) -> None:
        """Queue a request. Raises ``ValueError`` for requests that can never run."""
        cfg = self.config
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        if req.num_prompt_tokens == 0:
            raise ValueError("the prompt is empty: at least one token is needed")
        if req.num_prompt_tokens >= cfg.max_model_len:
            raise ValueError(
                f"the prompt has {req.num_prompt_tokens} tokens; the model's context length is "
                f"{cfg.max_model_len}, which leaves no room to generate"
            )
        max_tokens = req.sampling_params.max_tokens
        longest = cfg.max_model_len if max_tokens is None else min(cfg.max_model_len, req.num_prompt_tokens + max_tokens)
        if self._peak_blocks(req, longest) > self.kv.num_blocks:
            raise ValueError(
                f"the request needs up to {longest} tokens of KV but the cache holds only "
                f"{self.kv.num_blocks * cfg.block_size}; lower max_tokens or give the cache more memory"
            )
        if req.kv_eviction is not None and req.hold_kv:
            raise ValueError("a request whose KV is exported (hold_kv) cannot evict KV")
        if cfg.max_waiting is not None and len(self.waiting) >= cfg.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({cfg.max_waiting} requests)")
        req.seq_no = self._seq
        self._seq += 1
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)  # arrival_time and seq_no only grow for a live clock
        if len(self.waiting) > 1 and self._order(self.waiting[-2]) > self._order(req):
            self.waiting.sort(key=self._order)
        self.policy.on_arrival(req, req.arrival_time if now is None else now)
        if self.timeline is not None:
            self.timeline.arrival(req.request_id, req.arrival_time if now is None else now)

    def _peak_blocks(self, req: Request, longest: int) -> int:
        """The most blocks ``req`` holds at once on its way to ``longest`` tokens."""
        need = self.kv.blocks_for(longest)
        if req.kv_eviction is not None:  # the budget, and a step's chunk on top of it
            need = min(need, self.kv.blocks_for(req.kv_eviction.budget + self.config.max_num_batched_tokens))
        window = self.config.kv_window
        if window is not None and not req.hold_kv:
            # what the window keeps, and the step's chunk on top of it (one block of slack
            # for where the window and the chunk start inside their blocks)
            need = min(need, self.kv.blocks_for(window + self.config.max_num_batched_tokens) + 1)
        return need

    @staticmethod
    def _order(r: Request) -> tuple[float, int]:
        return (r.arrival_time, r.seq_no)

    # ----------------------------------------------------------- fan-out share

    @staticmethod
    def _parent(r: Request) -> str:
        return r.parent_id or r.request_id

    def _start_running(self, req: Request) -> None:
        self.running.append(req)
        if req.lora is not None:
            lid = req.lora.lora_int_id
            self._loras[lid] = self._loras.get(lid, 0) + 1
        cap = self.config.max_seqs_per_request
        if cap is not None and req.parent_id is not None:
            p = req.parent_id
            held = self._held[p] = self._held.get(p, 0) + 1
            if held > cap:
                self._over.add(p)

    def _stop_running(self, req: Request) -> None:
        self.running.remove(req)
        if req.lora is not None:
            lid = req.lora.lora_int_id
            left = self._loras[lid] - 1
            if left:
                self._loras[lid] = left
            else:
                del self._loras[lid]
        p = req.parent_id
        if p is not None and p in self._held:
            held = self._held[p] - 1
            if held:
                self._held[p] = held
            else:
                del self._held[p]
            if held <= self.config.max_seqs_per_request:  # type: ignore[operator]
                self._over.discard(p)

    def _lora_fits(self, req: Request) -> bool:
        """Whether ``req``'s adapter may run now: the base model, an adapter already running,
        or one more while fewer than ``max_loras`` adapters run."""
        cap = self.config.max_loras
        return (
            cap is None
            or req.lora is None
            or req.lora.lora_int_id in self._loras
            or len(self._loras) < cap
        )

    def _holds_share(self, req: Request) -> bool:
        """True when ``req``'s parent already holds its share of running slots."""
        cap = self.config.max_seqs_per_request
        return cap is not None and req.parent_id is not None and self._held.get(req.parent_id, 0) >= cap

    def _reclaim(self, now: float) -> list[Request]:
        """Preempt samples past their parent's share for the waiting requests within theirs.

        Called when every running slot is taken. Only requests the policy would
        admit count, and only as many slots as they lack, so a request that
        cannot start for other reasons (blocks, token budget) leaves the slot
        free rather than making samples bounce in and out.
        """
        cap = self.config.max_seqs_per_request
        assert cap is not None
        want = 0
        counted: dict[str, int] = {}
        for r in self.waiting:
            p = self._parent(r)
            k = counted.get(p, self._held.get(p, 0))
            if k < cap and self.policy.may_admit(r, now, self):
                counted[p] = k + 1
                want += 1
        want -= self.config.max_num_seqs - len(self.running)
        victims: list[Request] = []
        while want > 0 and self._over:
            p = max(self._over, key=lambda q: (self._held[q], q))
            victim = self.policy.choose_victim([r for r in self.running if r.parent_id == p], now, self)
            self._preempt(victim)
            victims.append(victim)
            want -= 1
        return victims

    def _victim_candidates(self, candidates: list[Request]) -> list[Request]:
        """Samples past their parent's share go first when blocks run short."""
        if self._over:
            over = [r for r in candidates if r.parent_id in self._over]
            if over:
                return over
        return candidates

    def abort_request(self, request_id: str, now: float = 0.0) -> Request | None:
        """Finish a request with ``abort``; its blocks are freed (full ones stay cached)."""
        return self.finish_request(request_id, FinishReason.ABORT, now=now)

    def finish_request(
        self, request_id: str, reason: FinishReason, stop_reason: int | str | None = None, now: float = 0.0
    ) -> Request | None:
        """Finish a request from outside the step (a stop string, an abort)."""
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return None
        if req.status is RequestStatus.RUNNING:
            self._stop_running(req)
        else:
            self.waiting.remove(req)
        self._finish(req, reason, stop_reason, now)
        return req

    def _finish(self, req: Request, reason: FinishReason, stop_reason: int | str | None, now: float) -> None:
        if req.status is RequestStatus.RUNNING:
            self._finished_ids.append(req.request_id)  # the executor holds state for it
        kv = self.kv
        kv.cache_blocks(req, req.num_computed_tokens)
        if req.hold_kv and reason is not FinishReason.ABORT:
            kv.hold(req)  # its KV is exported before ``release_kv``
        else:
            kv.free(req)
        kv.cancel_import(req.request_id)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        req.finish_time = now
        if self.timeline is not None:
            self.timeline.finished(req.request_id, now, req.first_token_time, reason.value, len(req.output_token_ids))
        del self.requests[req.request_id]
        req.draft_token_ids = []
        self.spec.forget(req.request_id)
        self.policy.on_finished(req, now)

    # ------------------------------------------------------ KV between replicas

    def reserve_import(self, req: Request, num_tokens: int) -> tuple[int, list[int]] | None:
        """Reserve blocks for KV that another replica computed (prefill/decode disaggregation).

        Call before ``add_request(req)``; the request's first ``num_tokens``
        tokens then need no compute, and it is admitted only once added (after
        its KV has landed). Returns (tokens the prefix cache already held, the
        fresh blocks to write the rest into), or None when the blocks are not
        there (the caller adds the request plainly and it recomputes its prompt).
        """
        if req.request_id in self.requests:
            raise ValueError(f"request {req.request_id!r} is already queued")
        got = self.kv.reserve_import(req, num_tokens)
        if got is not None:
            self.kv.record_prefix_query(num_tokens, got[0])
        return got

    def cancel_import(self, request_id: str) -> bool:
        """Give back an import reservation whose request will not be added."""
        return self.kv.cancel_import(request_id)

    def release_kv(self, request_id: str) -> bool:
        """Free the blocks a finished ``hold_kv`` request kept for export."""
        return self.kv.release(request_id)

    # -------------------------------------------------------------- queries

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def prefix_match_tokens(self, req: Request) -> int:
        """Tokens of the request that the prefix cache would serve now (for cache-aware policies)."""
        if req.wants_prompt_logprobs:
            return 0
        return len(self.kv.get_computed_blocks(req)) * self.config.block_size

    def decode_run(self) -> tuple[int, int] | None:
        """The decode run the next plan would be, if it can be a multi-step plan at all.

        A multi-step plan can only consist of one-token decodes of running
        requests while no admission is possible (no preemption, no prefill
        chunk); when that holds now, returns (how many decode, their context
        tokens), which a simulator prices to cap the plan's length before
        ``schedule``. None: the next plan is a single step.
        """
        running = self.running
        if not running or self._admission_possible():
            return None
        if self._over and self.waiting:
            return None  # the fan-out share will reclaim a slot: a preemption, a single step
        if self.spec.config.enabled and any(self._spec_lengths()):
            return None  # a speculative step
        m = len(running)
        budget = self.config.max_num_batched_tokens
        if m > budget:
            m = budget
            running = running[:m]
        ctx = 0
        for r in running:
            nt = len(r.prompt_token_ids) + len(r.output_token_ids)
            if r.num_computed_tokens != nt - 1:
                return None
            ctx += nt
        return m, ctx

    def _admission_possible(self) -> bool:
        """Whether a waiting request could be admitted if blocks and budget allowed."""
        return bool(self.waiting) and len(self.running) < self.config.max_num_seqs

    def stats(self) -> SchedulerStats:
        kv = self.kv
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_blocks=kv.num_blocks,
            num_used_blocks=kv.pool.num_used,
            num_cached_blocks=kv.cache.num_cached_blocks if kv.cache else 0,
            kv_usage=kv.usage,
            num_preemptions=self.num_preemptions,
            prefix_query_tokens=kv.prefix_query_tokens,
            prefix_hit_tokens=kv.prefix_hit_tokens,
            num_evicted_blocks=kv.cache.num_evicted_blocks if kv.cache else 0,
        )

    # ------------------------------------------------------------- schedule

    def schedule(self, now: float, max_steps: int | None = None) -> StepPlan:
        """Decide the next step. ``max_steps`` caps a multi-step plan (e.g. at the next arrival)."""
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        # (request, first token, tokens, admitted now): made into ScheduledSeqs at the end,
        # once the blocks of every sub-step are reserved.
        seqs: list[tuple[Request, int, int, bool]] = []
        preempted: list[Request] = []
        # 0. Fan-out share: free slots held by samples past their parent's share.
        reclaimed: list[Request] = []
        if self._over and self.waiting and len(self.running) >= cfg.max_num_seqs:
            reclaimed = self._reclaim(now)
        running = self.running
        kv = self.kv
        tables = kv.tables
        bs = cfg.block_size
        if self._finished_ids:
            finished_ids, self._finished_ids = self._finished_ids, []
        else:
            finished_ids = []

        # Speculative decoding: draft lengths of the running requests (request id -> k).
        spec = self._spec_lengths_by_id() if self.spec.config.enabled else None
        drafts: dict[str, int] = {}  # request id -> draft tokens verified in this step

        # 1. Running requests, in admission order. running[:i] are the ones scheduled so far.
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            nc = req.num_computed_tokens
            total = len(req.prompt_token_ids) + len(req.output_token_ids)
            n = total - nc
            if n > budget:
                n = budget
            kv.free_outside_window(req)
            k = 0
            if spec is not None and n == 1 and req.draft_token_ids:
                k = min(len(req.draft_token_ids), spec.get(req.request_id, 0), budget - 1, self._draft_room(req, 0))
            table = tables.get(req.request_id)
            if table is None or len(table) * bs < kv.entries_needed(req, n + k):  # else the blocks are held
                if k and not kv.allocate_slots(req, n + k):
                    k = 0  # drafts go first when blocks run short
                while not kv.allocate_slots(req, n):
                    victim = self.policy.choose_victim(self._victim_candidates(running[i:]), now, self)
                    self._preempt(victim)
                    preempted.append(victim)
                    if victim is req:
                        break
                if req.status is not RequestStatus.RUNNING:
                    continue  # preempted itself; self.running shifted left
            if k:
                drafts[req.request_id] = k
            seqs.append((req, nc, n, False))
            budget -= n + k
            i += 1

        # 2. Waiting requests, in policy order (none while we are preempting). When
        # nothing could be admitted, do not ask the policy to order the queue: for
        # cache-aware policies that costs a prefix match per waiting request.
        if not preempted and self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            admitted = self._admit(now, budget, seqs)
            if admitted:
                admitted_set = set(map(id, admitted))
                self.waiting = [r for r in self.waiting if id(r) not in admitted_set]

        preempted = reclaimed + preempted
        propose = self._reserve_proposals(seqs, spec, drafts) if spec is not None else {}
        if drafts or propose:
            num_steps = 1
        else:
            num_steps = self._multi_step_count(seqs, preempted, max_steps)
        self._step += 1
        plan = StepPlan(
            step_id=self._step,
            now=now,
            seqs=self._snapshot(seqs, drafts, propose),
            num_steps=num_steps,
            preempted_ids=[r.request_id for r in preempted],
            finished_ids=finished_ids,
            num_batched_tokens=sum(t[2] for t in seqs) + sum(drafts.values()),
            num_waiting=len(self.waiting),
            num_running=len(self.running),
        )
        self._plan_step = self._step
        self._plan_requests = [t[0] for t in seqs]
        if cfg.debug_checks:
            self._check()
        return plan

    def _snapshot(
        self, picked: list[tuple[Request, int, int, bool]], drafts: dict[str, int], propose: dict[str, int]
    ) -> list[ScheduledSeq]:
        """The plan's sequences as data: tokens to feed, block table diffs, setups of admissions."""
        if self.lean_plans:
            seqs = [ScheduledSeq(req.request_id, start, n, _NONE, 0, _NONE,
                                 start + n == len(req.prompt_token_ids) + len(req.output_token_ids), None,
                                 lora_id=req.lora_id)
                    for req, start, n, _ in picked]  # fmt: skip
        else:
            table_diff = self.kv.table_diff
            seqs = []
            for req, start, n, admitted in picked:
                end = start + n
                offset, blocks = table_diff(req.request_id)
                setup = None
                if admitted:
                    setup = SeqSetup(req.prompt_token_ids, list(req.output_token_ids), req.sampling_params,
                                     req.eos_token_ids, req.sample_index, kv_eviction=req.kv_eviction,
                                     lora=req.lora)  # fmt: skip
                seqs.append(ScheduledSeq(req.request_id, start, n, req.token_ids_slice(start, end), offset, blocks,
                                         end == req.num_tokens, setup, kv_offset=start - self.kv.kv_len(req),
                                         lora_id=req.lora_id))  # fmt: skip
        if drafts or propose:
            # Speculative decoding: the drafts each decode verifies and the proposals it asks for
            # (lean plans carry them too: the twin prices a step by its drafts).
            for s, (req, _, _, _) in zip(seqs, picked, strict=True):
                k = drafts.get(req.request_id)
                if k:
                    s.draft_token_ids = req.draft_token_ids[:k]
                s.num_propose = propose.get(req.request_id, 0)
        return seqs

    # --------------------------------------------------------- speculative decoding

    def _spec_lengths(self) -> list[int]:
        """The controller's draft length for each running request (``self.running`` order).
        Structured-output requests get none: a draft cannot be checked against the
        grammar's mask before the tokens ahead of it are accepted."""
        lengths = self.spec.plan([r.request_id for r in self.running])
        return [0 if r.sampling_params.structured_outputs is not None else k
                for r, k in zip(self.running, lengths, strict=True)]  # fmt: skip

    def _spec_lengths_by_id(self) -> dict[str, int]:
        return dict(zip((r.request_id for r in self.running), self._spec_lengths(), strict=True))

    def _draft_room(self, req: Request, appended: int) -> int:
        """Draft tokens that can still pay for a request once ``appended`` more tokens are in:
        the drafts and the target's own token must fit under ``max_tokens`` and the context."""
        max_tokens = req.sampling_params.max_tokens
        n_out = len(req.output_token_ids) + appended
        room = self.config.max_model_len - req.num_tokens - appended - 1
        if max_tokens is not None and max_tokens - n_out - 1 < room:
            room = max_tokens - n_out - 1
        return room if room > 0 else 0

    def _reserve_proposals(
        self, picked: list[tuple[Request, int, int, bool]], spec: dict[str, int], drafts: dict[str, int]
    ) -> dict[str, int]:
        """Ask the running sequences that sample to propose drafts for the next step.

        A draft model writes its KV at the positions of the drafts it proposes,
        so their slots are reserved now, from the blocks left after admissions
        (a proposal never preempts anyone; without the blocks, none is asked).
        """
        kv = self.kv
        propose: dict[str, int] = {}
        if any(admitted and start + n == req.num_tokens for req, start, n, admitted in picked):
            spec = self._spec_lengths_by_id()  # the batch grew: newcomers sample too
        for req, start, n, _ in picked:
            if start + n != req.num_tokens:
                continue  # a prefill chunk that does not sample
            rid = req.request_id
            k = drafts.get(rid, 0)
            p = min(spec.get(rid, 0), self._draft_room(req, 1), self.config.max_model_len - req.num_tokens - k)
            if p > 0 and kv.allocate_slots(req, n + k + p):
                propose[rid] = p
        return propose

    def _plan_of(self, plan: StepPlan) -> list[Request]:
        """The live requests of ``plan``, which must be the last one scheduled."""
        if plan.step_id != self._plan_step:
            raise ValueError(f"plan {plan.step_id} is not the last one scheduled ({self._plan_step})")
        return self._plan_requests

    def _admit(self, now: float, budget: int, seqs: list[tuple[Request, int, int, bool]]) -> list[Request]:
        """Admit waiting requests in policy order; samples whose parent holds its share
        of slots go after the others (a second pass), so they only take what is left."""
        cfg = self.config
        admitted: list[Request] = []
        deferred: list[Request] = []
        blocked = False
        for req in self.policy.order_waiting(self.waiting, now, self):
            if budget <= 0 or len(self.running) >= cfg.max_num_seqs:
                break
            if not self.policy.may_admit(req, now, self) or not self._lora_fits(req):
                continue
            if self._holds_share(req):
                deferred.append(req)
                continue
            n = self._try_admit(req, now, budget, seqs)
            if n is None:
                blocked = True  # blocks are short: later requests would only jump the queue
                break
            admitted.append(req)
            budget -= n
        if deferred and not blocked:
            for req in deferred:
                if budget <= 0 or len(self.running) >= cfg.max_num_seqs:
                    break
                if not self._lora_fits(req):
                    continue
                n = self._try_admit(req, now, budget, seqs)
                if n is None:
                    break
                admitted.append(req)
                budget -= n
        return admitted

    def _try_admit(self, req: Request, now: float, budget: int, seqs: list[tuple[Request, int, int, bool]]) -> int | None:
        """Admit ``req`` with up to ``budget`` tokens; return the tokens planned, None if it cannot.

        A request whose first tokens' KV was imported (``reserve_import``) takes
        its reservation as its table and computes only the rest.
        """
        cfg = self.config
        kv = self.kv
        imported = kv.imports.get(req.request_id)
        if imported is not None:
            start = imported[1]
        else:
            # A request that wants its prompt's logprobs computes every prompt position,
            # cached or not (as vLLM does): the cache holds KV, not logits.
            computed = [] if req.wants_prompt_logprobs else kv.get_computed_blocks(req)  # (none when evicting)
            start = len(computed) * cfg.block_size
        n = req.num_tokens - start
        if n > budget:
            if not cfg.enable_chunked_prefill:
                return None
            n = budget
        if imported is not None:
            if kv.blocks_for(start + n) - len(imported[0]) > kv.num_available:
                return None
            kv.take_import(req)
            req.num_computed_tokens = start
            kv.allocate_slots(req, n)
        elif not kv.allocate_slots(req, n, computed):
            return None
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = start
            req.first_scheduled_time = now
            if imported is None:  # an import's lookup was counted when it was reserved
                kv.record_prefix_query(req.num_prompt_tokens, start)
        req.num_computed_tokens = start
        kv.free_outside_window(req)  # a cached prefix longer than the window
        req.status = RequestStatus.RUNNING
        self._start_running(req)
        seqs.append((req, start, n, True))
        self.policy.on_admitted(req, now)
        return n

    def _preempt(self, req: Request) -> None:
        """Preempt by recompute: keep full blocks in the prefix cache, free the rest."""
        self._stop_running(req)
        self.kv.cache_blocks(req, req.num_computed_tokens)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.draft_token_ids = []
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        bisect.insort(self.waiting, req, key=self._order)
        self.num_preemptions += 1

    def _multi_step_count(
        self, seqs: list[tuple[Request, int, int, bool]], preempted: list[Request], max_steps: int | None
    ) -> int:
        k = self.config.max_decode_steps if max_steps is None else min(max_steps, self.config.max_decode_steps)
        if k <= 1 or preempted or not seqs:
            return 1
        # Admission must be impossible whatever happens inside the plan.
        if self._admission_possible():
            return 1
        max_len = self.config.max_model_len
        for r, start, n, _ in seqs:
            n_out = len(r.output_token_ids)
            if n != 1 or start + 1 != len(r.prompt_token_ids) + n_out:
                return 1  # a prefill chunk, or a sequence that does not sample
            mt = r.sampling_params.max_tokens
            if mt is not None and mt - n_out < k:
                k = mt - n_out
            room = max_len - len(r.prompt_token_ids) - n_out
            if room < k:
                k = room
        if k <= 1:
            return 1
        kv = self.kv
        tables = kv.tables
        short: list[Request] = []
        need = 0
        for r, _, _, _ in seqs:
            extra = kv.blocks_for(kv.entries_needed(r, 1, k)) - len(tables[r.request_id])
            if extra > 0:
                need += extra
                short.append(r)
        if need > kv.num_available:
            return 1
        for r in short:  # the others hold their blocks already
            kv.allocate_slots(r, kv.entries_needed(r, 1, k) - kv.kv_len(r))
        return k

    def shorten_plan(self, plan: StepPlan, num_steps: int) -> None:
        """Cut a multi-step plan, before its ``update``, to its first ``num_steps`` sub-steps.

        The blocks reserved for the dropped sub-steps go back to the front of
        the free list, so every request holds as many blocks as a plan made
        with ``max_steps=num_steps`` would have given it and later decisions
        are the same (block ids may differ; and cached blocks evicted to make
        the reservation stay evicted). The simulator calls this when a request
        reaches a replica in the middle of a plan: an engine stepping one
        decode at a time would admit it at the next sub-step boundary.
        """
        if not 1 <= num_steps <= plan.num_steps:
            raise ValueError(f"a {plan.num_steps}-step plan cannot be cut to {num_steps} steps")
        if num_steps == plan.num_steps:
            return
        # Reservations were made seq by seq in plan order; undo them in reverse.
        for s, req in zip(reversed(plan.seqs), reversed(self._plan_of(plan)), strict=True):
            self.kv.trim(req, self.kv.entries_needed(req, s.num_new_tokens, num_steps))
        plan.num_steps = num_steps
        if self.config.debug_checks:
            self._check()

    # --------------------------------------------------------------- update

    def update(self, plan: StepPlan, result: StepResult) -> list[SeqUpdate]:
        """Advance the requests of ``plan`` by ``result``; return what changed, as data.

        A request with an entry in ``result.stop_strings`` takes the tokens up to
        the one that completed the stop string and finishes with ``stop``.
        """
        now = plan.now + (result.duration or 0.0)
        if self.timeline is not None:
            self.timeline.plan(plan, result.duration or 0.0)
        updates: list[SeqUpdate] = []
        sampled = result.sampled_token_ids
        logprobs = result.logprobs
        prompt_lps = result.prompt_logprobs
        stop_strings = result.stop_strings
        policy = self.policy
        on_generated = policy.on_generated
        max_model_len = self.config.max_model_len
        running_status = RequestStatus.RUNNING
        t_plan = plan.now
        for s, req in zip(plan.seqs, self._plan_of(plan), strict=True):
            if req.status is not running_status:
                continue  # aborted or finished from outside since the plan was made
            if not s.samples:
                req.num_computed_tokens += s.num_new_tokens
                if req.kv_eviction is not None:
                    self._evicted(req, result)
                policy.on_computed(req, s.num_new_tokens, t_plan)
                # A long prompt shares each chunk as soon as its KV exists, so that
                # requests with the same prefix need not wait for the whole prefill.
                self.kv.cache_blocks(req, req.num_computed_tokens)
                if prompt_lps and req.request_id in prompt_lps:
                    updates.append(SeqUpdate(req, [], prompt_logprobs=prompt_lps[req.request_id]))
                continue
            if s.num_new_tokens > 1:
                policy.on_computed(req, s.num_new_tokens, t_plan)
            rid = req.request_id
            stop = stop_strings.get(rid) if stop_strings else None
            if stop is None:
                new, reason, stop_reason = req.append_output(sampled[rid], max_model_len)
            else:
                new, reason, stop_reason = req.append_output(sampled[rid][: stop[0]], max_model_len)
                if len(new) == stop[0]:  # else a stop token came first
                    reason, stop_reason = FinishReason.STOP, stop[1]
            if req.first_token_time is None and new:
                req.first_token_time = now
            req.num_computed_tokens = len(req.prompt_token_ids) + len(req.output_token_ids) - 1
            on_generated(req, len(new), t_plan)
            if s.draft_token_ids:
                self.spec.observe(rid, len(s.draft_token_ids), len(sampled[rid]) - 1)
            if reason is not None:
                self._stop_running(req)
                self._finish(req, reason, stop_reason, now)
            else:
                if req.kv_eviction is not None:
                    self._evicted(req, result)
                elif s.num_new_tokens > 1:
                    # Share the prompt with later requests as soon as its KV exists.
                    self.kv.cache_blocks(req, req.num_computed_tokens)
                if s.draft_token_ids or s.num_propose or req.draft_token_ids:
                    self._take_proposal(req, s.num_propose, result.draft_token_ids)
            lps = logprobs.get(rid) if logprobs else None
            updates.append(
                SeqUpdate(req, new, lps[: len(new)] if lps else None, reason is not None, reason, stop_reason,
                          prompt_lps.get(rid) if prompt_lps else None)  # fmt: skip
            )
        if self.config.debug_checks:
            self._check()
        return updates

    def _take_proposal(self, req: Request, asked: int, proposed: dict[str, list[int]] | None) -> None:
        """Keep the drafts proposed for the request's next step; give back the blocks
        reserved past them (rejected drafts' slots and an unused proposal's)."""
        got = proposed.get(req.request_id) if proposed else None
        req.draft_token_ids = list(got[:asked]) if got else []
        self.kv.trim(req, req.num_tokens + len(req.draft_token_ids))
    def _evicted(self, req: Request, result: StepResult) -> None:
        """A request with a KV budget after its step: note what the executor evicted (an
        executor without KV, the simulator's, reports nothing) and give back emptied blocks."""
        reported = result.kv_evicted.get(req.request_id) if result.kv_evicted else None
        if reported is not None:
            self.kv.record_eviction(req, reported)
        self.kv.shrink_to_budget(req)

    def _check(self) -> None:
        self.kv.check_invariants()
        live = {r.request_id for r in self.running}
        for rid in self.kv.tables:
            if rid not in live:
                raise AssertionError(f"request {rid} holds blocks but is not running")
        for rid in self.kv.held:
            if rid in self.requests:
                raise AssertionError(f"request {rid} holds KV for export but has not finished")
        loras: dict[int, int] = {}
        for r in self.running:
            if r.lora is not None:
                loras[r.lora.lora_int_id] = loras.get(r.lora.lora_int_id, 0) + 1
        if loras != self._loras:
            raise AssertionError(f"adapter books {self._loras} disagree with running {loras}")
        cap = self.config.max_seqs_per_request
        if cap is not None:
            held: dict[str, int] = {}
            for r in self.running:
                if r.parent_id is not None:
                    held[r.parent_id] = held.get(r.parent_id, 0) + 1
            if held != self._held or self._over != {p for p, k in held.items() if k > cap}:
                raise AssertionError(f"fan-out books {self._held} / {self._over} disagree with running {held}")
