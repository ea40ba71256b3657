"""Run a ``StepPlan`` through the real model: one mixed forward pass, then sampling.

The executor owns the model, the preallocated paged KV cache (all layers in
one tensor) and the sampler. It never decides anything: the plan says which
tokens of which request to compute, which cache blocks they live in, and who
samples. A multi-step plan (``num_steps > 1``, one-token decodes only) loops
its sub-steps here, feeding each sampled token back, so the scheduler and the
engine pay their per-step cost once.

Plans are snapshots (``core/plan.py``): the executor keeps, per running
request, what the plan that admitted it sent (``SeqSetup``), its block table
(patched by each plan's diffs) and the tokens it has sampled for it, and drops
them when a plan names the request finished or preempted. It never sees a
live ``Request``, so it could run in another process. Structured output: a
request with a grammar gets its matcher when a plan admits it (kept with its
state), and every sub-step masks its sampling row with the grammar's allowed
tokens and advances the matcher on the token drawn (``structured/decoding.py``).
A caller that streams passes
``on_substep``: it sees the tokens sampled so far after every sub-step but the
last, so that they can reach clients as they are sampled rather than in a
burst at the end of the plan. For a request that wants its prompt's
logprobs, the first sub-step also computes the logits of every prompt
position of its chunk (in slices, so a long prompt never holds a
``tokens x vocab`` tensor at once).

LoRA: a request's adapter comes with its ``SeqSetup``; the executor's
``LoraManager`` loads it if it is not resident (unloading an idle one, LRU)
before anything of the plan runs, and each forward pass gets a ``LoraBatch``
saying which rows run which adapter. An adapter that cannot be loaded any
more (its directory changed since it was registered) raises
``LoraLoadError`` naming the requests that need it; the engine aborts them
and runs the rest of the plan.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmill.core.executor_state import ExecutorState, SeqView
from tokenmill.core.kv_manager import NULL_BLOCK
from tokenmill.core.lora import LoRARequest
from tokenmill.core.plan import ScheduledSeq, StepPlan, StepResult
from tokenmill.executor.kv_evictor import KVEvictor
from tokenmill.lora.errors import LoraError, LoraLoadError
from tokenmill.lora.manager import LoraManager
from tokenmill.model.attention import AttentionMetadata
from tokenmill.model.config import ModelConfig, resolve_dtype
from tokenmill.model.kv_format import KVFormat, kv_format
from tokenmill.model.loader import load_model
from tokenmill.model.sampler import LogprobEntry, Sampler, SamplingRow
from tokenmill.model.threads import configure as configure_threads
from tokenmill.spec import ProposeItem, make_proposer
from tokenmill.spec.verify import VerifySpan, verify
from tokenmill.structured.decoding import StepMasks

# A plan whose token count is below this builds slot mappings in Python; above it in torch.
_TORCH_SLOTS_MIN_TOKENS = 64

# Prompt logprobs: rows of logits computed at once (bounds the tokens x vocab tensor).
_PROMPT_LOGPROB_ROWS = 256

# ``on_substep(sampled, logprobs)``: per request, the tokens (and logprob entries, for
# requests that asked) sampled so far in the plan. Read-only: the lists keep growing.
SubStepCallback = Callable[[dict[str, list[int]], dict[str, list[LogprobEntry]]], None]


@dataclass(slots=True)
class _Batch:
    """Flattened inputs of one forward pass."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    query_start: list[int] = field(default_factory=lambda: [0])
    seq_lens: list[int] = field(default_factory=list)
    block_rows: list[list[int]] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)  # flattened row index of each sampler
    # With KV eviction: each token's KV entry (its position less what its sequence evicted;
    # None: the positions themselves), and per evicting sequence what ``KVEvictor`` takes in.
    entries: list[int] | None = None
    evict_rows: list[tuple[str, int, int, int, list[int]]] = field(default_factory=list)
    attn_mass: torch.Tensor | None = None
    lora: list[tuple[LoRARequest, int, int]] = field(default_factory=list)  # (adapter, first row, rows)


class ModelExecutor:
    """Executes step plans on a loaded model with a paged KV cache of ``num_blocks`` blocks."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        kv_cache_memory: int = 256 * 2**20,
        kv_cache_dtype: str = "auto",
        expert_cache_memory: int | None = None,
        expert_prefetch: bool = True,
        block_size: int = 16,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
        threads: int | None = None,
        speculative: str | None = None,
        max_loras: int = 4,
        max_lora_rank: int = 16,
    ) -> None:
        self.device = torch.device(device)
        self.kv_format: KVFormat = kv_format(kv_cache_dtype)  # refuses an unknown name first
        self.model, self.model_config = load_model(
            model_path, dtype=dtype, device=self.device, expert_cache_memory=expert_cache_memory,
            expert_prefetch=expert_prefetch,
        )
        self.dtype = self.model_config.dtype
        # The longest sliding window when every layer has one (the core then frees the KV
        # blocks all windows have passed); None when any layer attends to the whole context.
        windows = self.model_config.layer_windows
        self.kv_window: int | None = max(windows) if windows and all(windows) else None
        self.block_size = block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.kv_bytes_per_block = self.kv_cache_bytes_per_block(
            self.model_config, block_size, self.dtype, self.kv_format
        )
        # Speculative decoding (tokenmill/spec): a draft model's KV lives on the same
        # block ids, so each block costs the draft's bytes too.
        self.proposer = None if speculative is None else make_proposer(speculative, self, model_path)
        per_block = self.kv_bytes_per_block
        if self.proposer is not None and self.proposer.writes_kv:
            per_block += self.proposer.kv_bytes_per_block(block_size)
        self.num_blocks = kv_cache_memory // per_block
        if self.num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory={kv_cache_memory} bytes holds no KV block "
                f"(one block of {block_size} tokens needs {per_block} bytes)"
            )
        cfg = self.model_config
        shape = self.kv_format.cache_shape(self.num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_cache = torch.zeros(
            (cfg.num_layers, *shape), dtype=self.kv_format.cache_dtype(self.dtype), device=self.device
        )
        self.kv_caches = list(self.kv_cache.unbind(0))
        if self.proposer is not None and self.proposer.writes_kv:
            self.proposer.allocate_cache(self.num_blocks)
        self.sampler = Sampler(self.device)
        # the CPU kernels' thread count: fitted to the cores this process gets (None), or fixed
        self.threads = configure_threads(threads, self.device)
        self.state = ExecutorState()
        self.evictor = KVEvictor(self.device)  # requests with a KV budget (kv_evictor.py)
        self.loras = LoraManager(self.model, self.model_config, max_loras, max_lora_rank)
        self.masks = StepMasks(self.model_config.vocab_size)

    @classmethod
    def from_config(cls, config: Any) -> ModelExecutor:
        """The executor an ``EngineConfig`` describes."""
        from tokenmill.engine import resolve_model_path

        return cls(
            resolve_model_path(config.model),
            dtype=config.dtype,
            device=config.device,
            kv_cache_memory=config.kv_cache_memory,
            kv_cache_dtype=config.kv_cache_dtype,
            expert_cache_memory=config.expert_cache_memory,
            expert_prefetch=config.expert_prefetch,
            block_size=config.block_size,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            threads=config.threads,
            speculative=getattr(config, "speculative", None),
            max_loras=config.max_loras,
            max_lora_rank=config.max_lora_rank,
        )

    # The model facts an engine takes from its executor (see executor/__init__.py).
    @property
    def max_model_len(self) -> int:
        return self.model_config.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self.model_config.eos_token_ids)

    @property
    def draft_cost(self) -> float | None:
        """One draft step's cost over one target decode step (None: no speculation)."""
        return None if self.proposer is None else self.proposer.draft_cost

    @staticmethod
    def kv_cache_bytes_per_block(
        model_config: ModelConfig,
        block_size: int = 16,
        dtype: str | torch.dtype | None = None,
        kv_cache_dtype: str | KVFormat = "auto",
    ) -> int:
        """Bytes of K and V, all layers, for one block of ``block_size`` tokens (scales included)."""
        dt = model_config.dtype if dtype is None else resolve_dtype(dtype, None)
        fmt = kv_format(kv_cache_dtype)
        return (
            2 * model_config.num_layers * model_config.num_kv_heads
            * fmt.head_block_bytes(block_size, model_config.head_dim, dt)
        )  # fmt: skip

    # -- KV blocks as bytes (moving KV between replicas) ----------------------------------

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of blocks' K and V in every layer, ``[layers, 2, n, kv_heads, elements]``, in
        the cache's own storage (quantized blocks stay quantized: ``kv_bytes_per_block`` each)."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return self.kv_cache.index_select(2, idx)

    def write_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Store what ``read_blocks`` returned (from a cache of the same format) into ``block_ids``."""
        want = (*self.kv_cache.shape[:2], len(block_ids), *self.kv_cache.shape[3:])
        if tuple(data.shape) != want or data.dtype != self.kv_cache.dtype:
            raise ValueError(
                f"KV blocks of shape {tuple(data.shape)} / {data.dtype} do not fit this cache "
                f"({want} / {self.kv_cache.dtype}, KV dtype {self.kv_format.name})"
            )
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        self.kv_cache.index_copy_(2, idx, data.to(self.device))
    # -- adapters -------------------------------------------------------------------------

    def add_lora(self, lora: LoRARequest) -> None:
        """Load and check an adapter now (``LoraError`` if it cannot run on this model)."""
        self.loras.load(lora, self._loras_in_use())

    def remove_lora(self, lora_id: int) -> None:
        """Unload an adapter unless a running request still uses it (it then goes by LRU)."""
        if lora_id not in self._loras_in_use():
            self.loras.remove(lora_id)

    def _loras_in_use(self) -> set[int]:
        return {v.setup.lora.lora_int_id for v in self.state.seqs.values() if v.setup.lora is not None}

    def _load_loras(self, plan: StepPlan) -> None:
        """Make every adapter of the plan's newly admitted requests resident."""
        wanted = {s.setup.lora for s in plan.seqs if s.setup is not None and s.setup.lora is not None}
        if not wanted:
            return
        in_use = self._loras_in_use()
        failed: dict[int, str] = {}
        for lora in wanted:
            try:
                self.loras.load(lora, in_use)
            except LoraError as exc:
                failed[lora.lora_int_id] = str(exc)
        if failed:
            ids = [s.request_id for s in plan.seqs if s.lora_id in failed]
            raise LoraLoadError("; ".join(failed.values()), ids, list(failed))

    # -- one plan -------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, plan: StepPlan, on_substep: SubStepCallback | None = None) -> StepResult:
        """Run ``plan`` (all its sub-steps) and return the sampled tokens and logprobs.

        ``on_substep`` is called after each sub-step except the last with what has
        been sampled so far (see ``SubStepCallback``).
        """
        start = time.perf_counter()
        result = StepResult(sampled_token_ids={})
        states = self.state.apply(plan)  # idempotent: a plan may come again, cut, after a LoraLoadError
        if self.proposer is not None:
            self.proposer.drop(plan.finished_ids + plan.preempted_ids)
            for s in plan.seqs:
                if s.setup is not None:
                    self.proposer.reset(s.request_id, s.start_pos)
        self._load_loras(plan)
        evictor = self.evictor
        if evictor.seqs:
            evictor.drop(plan.finished_ids + plan.preempted_ids)
        for s in plan.seqs:
            if s.setup is not None:
                evictor.admit(s.request_id, s.setup.kv_eviction)
        if plan.is_empty:
            result.duration = 0.0
            return result
        self.masks.admit(plan.seqs, states)
        samplers = [(s, st) for s, st in zip(plan.seqs, states, strict=True) if s.samples]
        sampled: dict[str, list[int]] = {s.request_id: [] for s, _ in samplers}
        logprobs: dict[str, list[LogprobEntry]] = {}
        grammars = [st.grammar for _, st in samplers]
        structured = any(g is not None for g in grammars)

        batch = self._first_batch(plan.seqs, states)
        for step in range(plan.num_steps):
            if step > 0:
                batch = self._decode_batch(samplers, sampled, step)
            hidden = self._forward(batch)
            if batch.evict_rows:
                gone = evictor.after_forward(batch.evict_rows, batch.attn_mass, self.kv_cache, self.block_size,
                                             self.model_config.head_dim, self.kv_format)  # fmt: skip
                if gone:
                    if result.kv_evicted is None:
                        result.kv_evicted = {}
                    for rid, positions in gone.items():
                        result.kv_evicted.setdefault(rid, []).extend(positions)
            if step == 0:
                result.prompt_logprobs = self._prompt_logprobs(plan.seqs, states, batch, hidden)
            if not batch.sample_rows:
                continue
            rows_idx = torch.tensor(batch.sample_rows, device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, rows_idx))
            if len(batch.sample_rows) > len(samplers):  # drafts to verify (a single-step plan)
                sampled, logprobs = self._verify(samplers, logits, grammars if structured else None)
                break
            rows = [self._sampling_row(st, sampled[s.request_id]) for s, st in samplers]
            mask = None
            if structured:
                mask, constrained = self.masks.fill(grammars)
                for row, c in zip(rows, constrained, strict=True):
                    row.constrained = c
            out = self.sampler(logits, rows, mask)
            if structured:
                self.masks.accept(grammars, out.token_ids)
            for i, (s, _) in enumerate(samplers):
                sampled[s.request_id].append(out.token_ids[i])
                if out.logprobs is not None and out.logprobs[i] is not None:
                    logprobs.setdefault(s.request_id, []).append(out.logprobs[i])
            if on_substep is not None and step < plan.num_steps - 1:
                on_substep(sampled, logprobs)

        self.state.record(sampled)
        result.sampled_token_ids = sampled
        result.logprobs = logprobs or None
        if self.proposer is not None and any(s.num_propose for s in plan.seqs):
            t0 = time.perf_counter()
            items = [ProposeItem(s.request_id, st.token_ids(), s.num_propose, st.blocks, st.setup)
                     for s, st in zip(plan.seqs, states, strict=True) if s.num_propose]  # fmt: skip
            result.draft_token_ids = self.proposer.propose(items)
            result.draft_time = time.perf_counter() - t0
        result.duration = time.perf_counter() - start
        return result

    def _verify(
        self, samplers: list[tuple[ScheduledSeq, SeqView]], logits: torch.Tensor, grammars: list | None = None
    ) -> tuple[dict[str, list[int]], dict[str, list[LogprobEntry]]]:
        """Verify the drafts of a speculative step (spec/verify.py): ``logits`` hold
        ``k + 1`` rows per sampling sequence (1 for those without drafts). Structured-output
        sequences never carry drafts (the scheduler gives them none): their one row is
        masked by their grammar as in plain decoding."""
        rows: list[SamplingRow] = []
        spans: list[VerifySpan] = []
        owner: list[int] = []  # sampler index of each row
        for i, (s, st) in enumerate(samplers):
            d = s.draft_token_ids
            q = self.proposer.draft_probs(s.request_id, d) if d and self.proposer is not None else None
            spans.append(VerifySpan(s.request_id, len(rows), d, q))
            rows.extend(self._sampling_row(st, d[:j]) for j in range(len(d) + 1))
            owner.extend([i] * (len(d) + 1))
        mask = None
        if grammars is not None:
            one, constrained = self.masks.fill(grammars)
            if one is not None:
                mask = one[owner]
                for row, i in zip(rows, owner, strict=True):
                    row.constrained = constrained[i]
        sampled, logprobs = verify(self.sampler, logits, rows, spans, mask)
        if grammars is not None:
            self.masks.accept(grammars, [sampled[s.request_id][0] for s, _ in samplers])
        return sampled, logprobs

    def _prompt_logprobs(
        self, seqs: list[ScheduledSeq], states: list[SeqView], batch: _Batch, hidden: torch.Tensor
    ) -> dict[str, tuple[int, list[LogprobEntry]]] | None:
        """Logprobs of the prompt tokens predicted by the prompt positions of this step.

        Position ``p`` of a chunk predicts prompt token ``p + 1``; the last prompt
        position predicts the first output token, so it is the sampler's, not ours.
        """
        rows: list[int] = []
        targets: list[int] = []
        spans: list[tuple[str, int, int, int, int]] = []  # id, first token index, first row, count, top-N
        for i, (s, st) in enumerate(zip(seqs, states, strict=True)):
            setup = st.setup
            if not setup.wants_prompt_logprobs:
                continue
            prompt = setup.prompt_token_ids
            last = min(s.start_pos + s.num_new_tokens, len(prompt) - 1)
            if last <= s.start_pos:
                continue
            base = batch.query_start[i] - s.start_pos
            n = setup.sampling_params.prompt_logprobs or 0
            spans.append((s.request_id, s.start_pos + 1, len(rows), last - s.start_pos, n))
            rows.extend(range(base + s.start_pos, base + last))
            targets.extend(prompt[s.start_pos + 1 : last + 1])
        if not rows:
            return None
        top_n = max(span[4] for span in spans)
        chosen: list[float] = []
        top_vals: list[list[float]] = []
        top_ids: list[list[int]] = []
        for a in range(0, len(rows), _PROMPT_LOGPROB_ROWS):
            idx = torch.tensor(rows[a : a + _PROMPT_LOGPROB_ROWS], device=self.device)
            lp = self.model.compute_logits(hidden.index_select(0, idx)).float().log_softmax(dim=-1)
            tgt = torch.tensor(targets[a : a + _PROMPT_LOGPROB_ROWS], device=self.device)
            chosen.extend(lp.gather(1, tgt[:, None])[:, 0].tolist())
            if top_n:
                v, t = lp.topk(top_n, dim=-1)
                top_vals.extend(v.tolist())
                top_ids.extend(t.tolist())
        out: dict[str, tuple[int, list[LogprobEntry]]] = {}
        for rid, first, r0, count, n in spans:
            out[rid] = (
                first,
                [
                    (chosen[r], list(zip(top_ids[r][:n], top_vals[r][:n], strict=True)) if n else [])
                    for r in range(r0, r0 + count)
                ],
            )
        return out

    @staticmethod
    def _sampling_row(st: SeqView, earlier: list[int]) -> SamplingRow:
        setup = st.setup
        outputs = st.outputs + earlier if earlier else st.outputs
        return SamplingRow(
            setup.sampling_params, outputs, setup.prompt_token_ids, setup.eos_token_ids, setup.sample_index
        )

    def _first_batch(self, seqs: list[ScheduledSeq], states: list[SeqView]) -> _Batch:
        b = _Batch()
        evictor = self.evictor
        if evictor.seqs:
            b.entries = []
        for i, (s, st) in enumerate(zip(seqs, states, strict=True)):
            n = s.num_new_tokens + len(s.draft_token_ids)
            end = s.start_pos + n
            kv_end = end - s.kv_offset  # KV entries after this step's tokens are written
            b.input_ids.extend(s.token_ids)
            b.input_ids.extend(s.draft_token_ids)
            b.positions.extend(range(s.start_pos, end))
            b.query_start.append(b.query_start[-1] + n)
            b.seq_lens.append(kv_end)
            blocks = self._blocks(s.request_id, st, kv_end)
            b.block_rows.append(blocks)
            if b.entries is not None:
                b.entries.extend(range(kv_end - n, kv_end))
                if s.request_id in evictor:
                    if evictor.num_entries(s.request_id) != kv_end - n:
                        raise RuntimeError(
                            f"request {s.request_id!r}: the plan puts its KV at entry {kv_end - n}, "
                            f"it holds {evictor.num_entries(s.request_id)}"
                        )
                    b.evict_rows.append((s.request_id, i, s.start_pos, n, st.blocks))
            elif s.kv_offset:
                raise RuntimeError(f"request {s.request_id!r} has evicted KV but no budget")
            if s.samples:
                # the last token and each draft: k + 1 rows to verify k drafts
                last = b.query_start[-1]
                b.sample_rows.extend(range(last - 1 - len(s.draft_token_ids), last))
            if st.setup.lora is not None:
                b.lora.append((st.setup.lora, b.query_start[-2], n))
        return b

    def _blocks(self, request_id: str, st: SeqView, length: int) -> list[int]:
        """The blocks holding a sequence's first ``length`` tokens, checked against the cache."""
        n = (length + self.block_size - 1) // self.block_size
        blocks = st.blocks[:n]
        # NULL_BLOCK (-1): given back, outside every layer's window (the kernels never read it)
        if len(blocks) < n or (blocks and (max(blocks) >= self.num_blocks or min(blocks) < NULL_BLOCK)):
            raise ValueError(
                f"request {request_id!r}: {length} tokens need {n} blocks of "
                f"{self.block_size} in [0, {self.num_blocks}), got {st.blocks[: n + 1]}"
            )
        return blocks

    def _decode_batch(
        self, samplers: list[tuple[ScheduledSeq, SeqView]], sampled: dict[str, list[int]], step: int
    ) -> _Batch:
        # sub-step ``step`` feeds the token sampled in sub-step ``step - 1``
        b = _Batch()
        evictor = self.evictor
        if evictor.seqs:
            b.entries = []
        for i, (s, st) in enumerate(samplers):
            pos = s.start_pos + s.num_new_tokens + step - 1
            entry = evictor.num_entries(s.request_id) if s.request_id in evictor else pos
            b.input_ids.append(sampled[s.request_id][-1])
            b.positions.append(pos)
            b.query_start.append(i + 1)
            b.seq_lens.append(entry + 1)
            b.block_rows.append(self._blocks(s.request_id, st, entry + 1))
            b.sample_rows.append(i)
            if b.entries is not None:
                b.entries.append(entry)
                if s.request_id in evictor:
                    b.evict_rows.append((s.request_id, i, pos, 1, st.blocks))
            if st.setup.lora is not None:
                b.lora.append((st.setup.lora, i, 1))
        return b

    def _forward(self, b: _Batch) -> torch.Tensor:
        if b.evict_rows and self.evictor.wants_mass([r[0] for r in b.evict_rows]):
            # H2O: every layer's attention adds each key's probability mass here
            b.attn_mass = torch.zeros(len(b.seq_lens), self.model_config.num_kv_heads, max(b.seq_lens),
                                      device=self.device)  # fmt: skip
        lora = self.loras.batch(b.lora, self.device) if b.lora else None
        with self.threads.step():
            return forward_batch(self.model, self.kv_caches, b, self.block_size, self.device, lora,
                                 kv_format=self.kv_format, windowed=self.kv_window is not None)  # fmt: skip


def forward_batch(
    model: Any,
    kv_caches: list[torch.Tensor],
    b: _Batch,
    block_size: int,
    device: torch.device,
    lora: Any = None,
    *,
    kv_format: Any = None,
    windowed: bool = False,
) -> torch.Tensor:
    """One forward pass of a flattened batch over a paged KV cache (also a draft model's, which
    runs without adapters: its drafts are then worse, never the output).

    ``kv_format``: how the cache stores K and V (None: plain); ``windowed``: the tables may hold
    entries given back outside every layer's window (NULL), read as block 0 and masked.
    """
    dev, bs = device, block_size
    width = max(len(r) for r in b.block_rows)
    block_tables = torch.tensor([r + [0] * (width - len(r)) for r in b.block_rows], dtype=torch.int32)
    if windowed:
        block_tables.clamp_(min=0)
    positions = torch.tensor(b.positions, dtype=torch.long)
    entries = positions if b.entries is None else torch.tensor(b.entries, dtype=torch.long)
    if len(b.positions) >= _TORCH_SLOTS_MIN_TOKENS:
        seq_of_token = torch.repeat_interleave(
            torch.arange(len(b.seq_lens)),
            torch.tensor([e - s for s, e in zip(b.query_start, b.query_start[1:], strict=False)]),
        )
        blocks = block_tables[seq_of_token, entries // bs].long()
        slot_mapping = blocks * bs + entries % bs
    else:
        slot_mapping = torch.tensor([r[p // bs] * bs + p % bs for r, p in _row_entries(b)], dtype=torch.long)
    extra = {} if kv_format is None else {"kv_format": kv_format}
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(b.query_start, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(b.seq_lens, dtype=torch.int32, device=dev),
        block_tables=block_tables.to(dev),
        slot_mapping=slot_mapping.to(dev),
        max_query_len=max(e - s for s, e in zip(b.query_start, b.query_start[1:], strict=False)),
        max_seq_len=max(b.seq_lens),
        attn_mass=b.attn_mass,
        **extra,
    )
    input_ids = torch.tensor(b.input_ids, dtype=torch.long, device=dev)
    return model(input_ids, positions.to(dev), kv_caches, meta, lora)


def _row_entries(b: _Batch):
    entries = b.positions if b.entries is None else b.entries
    for i, row in enumerate(b.block_rows):
        for p in entries[b.query_start[i] : b.query_start[i + 1]]:
            yield row, p
