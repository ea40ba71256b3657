"""The step loop: schedule -> execute -> update, with the real model and wall time.

``Engine`` owns one scheduler (the core), one model executor and the output
processor. It validates and tokenizes requests, fans ``n`` samples out into
core requests, and turns updates into ``RequestOutput``s. It has no thread of
its own: callers (``LLM``, the async server engine) call ``step()``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from tokenmill.core.plan import StepPlan
from tokenmill.core.request import FinishReason, Request, SamplingParams
from tokenmill.core.scheduler import QueueFullError, Scheduler, SchedulerConfig, SchedulerStats
from tokenmill.output_processor import OutputProcessor
from tokenmill.outputs import RequestOutput

__all__ = ["Engine", "EngineConfig", "EngineStats", "QueueFullError", "StepRecord"]


@dataclass
class EngineConfig:
    model: str | None = None  # a local HF directory; None: the bundled default model
    tokenizer: str | None = None  # defaults to the model directory
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 | int8 (weight-only)
    device: str = "cpu"
    kv_cache_memory: int = 1 << 30  # bytes of KV cache
    # MoE models: bytes of RAM for experts, the rest memory-mapped (None: all experts in RAM)
    expert_cache_memory: int | None = None
    expert_prefetch: bool = True  # read the next layer's likely experts ahead (with a cache)
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: int | None = None  # defaults to the model's context length
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_decode_steps: int = 8  # decode steps one plan may cover when nothing can change
    max_waiting: int | None = None
    policy: str = "fcfs"
    policy_options: dict[str, Any] = field(default_factory=dict)
    debug_checks: bool = False
    record_steps: bool = False  # keep a StepRecord per step (for replay in the simulator)


@dataclass
class StepRecord:
    step_id: int
    added_before: list[str]  # core request ids added since the previous step
    summary: tuple
    duration: float


@dataclass
class EngineStats:
    scheduler: SchedulerStats
    num_steps: int
    num_prompt_tokens: int
    num_generation_tokens: int
    finished_by_reason: dict[str, int]
    # counters of an offloaded MoE model's expert cache (model.expert_cache.ExpertCacheStats)
    expert_cache: Any = None


def resolve_model_path(model: str | None) -> str:
    if model is not None:
        return str(model)
    from tokenmill.models import DEFAULT_MODEL_PATH

    return str(DEFAULT_MODEL_PATH)


class Engine:
    def __init__(self, config: EngineConfig, clock: Callable[[], float] = time.monotonic) -> None:
        from tokenmill.executor.model_executor import ModelExecutor
        from tokenmill.tokenizer import load_tokenizer

        self.config = config
        self.clock = clock
        model_path = resolve_model_path(config.model)
        self.model_path = model_path
        self.executor = ModelExecutor(
            model_path,
            dtype=config.dtype,
            device=config.device,
            kv_cache_memory=config.kv_cache_memory,
            expert_cache_memory=config.expert_cache_memory,
            expert_prefetch=config.expert_prefetch,
            block_size=config.block_size,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
        )
        mc = self.executor.model_config
        self.model_config = mc
        self.tokenizer = load_tokenizer(config.tokenizer or model_path)
        self.max_model_len = min(config.max_model_len or mc.max_model_len, mc.max_model_len)
        eos = set(mc.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.vocab_size = mc.vocab_size
        self.scheduler = Scheduler(
            SchedulerConfig(
                num_blocks=self.executor.num_blocks,
                block_size=config.block_size,
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                enable_prefix_caching=config.enable_prefix_caching,
                enable_chunked_prefill=config.enable_chunked_prefill,
                max_decode_steps=config.max_decode_steps,
                max_waiting=config.max_waiting,
                policy=config.policy,
                policy_options=dict(config.policy_options),
                debug_checks=config.debug_checks,
            )
        )
        self.outputs = OutputProcessor(self.tokenizer)
        self._children: dict[str, list[Request]] = {}
        self._added_since_step: list[str] = []
        self.step_log: list[StepRecord] = []
        self.num_steps = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.finished_by_reason: dict[str, int] = {}

    # ---------------------------------------------------------------- inputs

    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        arrival_time: float | None = None,
        client_id: str = "",
        priority: int = 0,
        ttft_slo: float | None = None,
        tpot_slo: float | None = None,
        cache_namespace: str = "",
        predicted_output_len: int | None = None,
    ) -> list[int]:
        """Validate and queue a request; returns its prompt token ids.

        Raises ``ValueError`` (bad input, named) or ``QueueFullError``; on
        either, nothing of the request is left behind.
        """
        params = params or SamplingParams()
        params.validate()
        if request_id in self._children:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text: str | None = prompt
            if not prompt:
                raise ValueError("the prompt is empty")
            prompt_ids = self.tokenize(prompt)
        else:
            text = None
            prompt_ids = [int(t) for t in prompt]
            bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if not prompt_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context length is "
                f"{self.max_model_len}"
            )
        arrival = self.clock() if arrival_time is None else arrival_time
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1:
                # Each sample gets its own seed so that seeded samples differ but stay reproducible.
                child_params = replace(params, n=1, seed=None if params.seed is None else params.seed + i)
            children.append(
                Request(
                    request_id=request_id if params.n == 1 else f"{request_id}#{i}",
                    prompt_token_ids=prompt_ids,
                    sampling_params=child_params,
                    arrival_time=arrival,
                    eos_token_ids=self.eos_token_ids,
                    client_id=client_id,
                    cache_namespace=cache_namespace,
                    priority=priority,
                    ttft_slo=ttft_slo,
                    tpot_slo=tpot_slo,
                    predicted_output_len=predicted_output_len,
                    parent_id=request_id,
                    sample_index=i,
                )
            )
        added: list[Request] = []
        try:
            for child in children:
                self.scheduler.add_request(child, arrival)
                added.append(child)
        except (ValueError, QueueFullError):
            for child in added:
                self.scheduler.abort_request(child.request_id)
            raise
        self._children[request_id] = children
        self._added_since_step.extend(c.request_id for c in children)
        self.outputs.add(request_id, text, prompt_ids, children, arrival)
        return prompt_ids

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Abort a user request (all its samples); its blocks are freed now."""
        children = self._children.pop(request_id, None)
        if children is None:
            return None
        now = self.clock()
        for child in children:
            if self.scheduler.abort_request(child.request_id, now) is not None:
                self.executor.free_request(child.request_id)
                self.finished_by_reason["abort"] = self.finished_by_reason.get("abort", 0) + 1
        return self.outputs.finish_aborted(request_id)

    # ------------------------------------------------------------------ step

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one plan; return an output for every user request that advanced."""
        plan = self.scheduler.schedule(self.clock())
        if plan.is_empty:
            return []
        t0 = self.clock()
        result = self.executor.execute(plan)
        result.duration = self.clock() - t0
        self._record(plan, result.duration)
        updates = self.scheduler.update(plan, result)
        now = self.clock()
        outputs, stopped = self.outputs.process(updates, now)
        for child_id, stop in stopped:
            self.scheduler.finish_request(child_id, FinishReason.STOP, stop, now)
        for u in updates:
            self.num_generation_tokens += len(u.new_token_ids)
        self.num_prompt_tokens += sum(s.num_new_tokens for s in plan.seqs if s.is_prefill)
        for child_id in plan.preempted_ids:
            self.executor.free_request(child_id)
        for out in outputs:
            if out.finished:
                for child in self._children.pop(out.request_id, []):
                    self.executor.free_request(child.request_id)
                for o in out.outputs:
                    reason = o.finish_reason or "stop"
                    self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1
        return outputs

    def _record(self, plan: StepPlan, duration: float) -> None:
        self.num_steps += 1
        if self.config.record_steps:
            self.step_log.append(StepRecord(plan.step_id, self._added_since_step, plan.summary(), duration))
        self._added_since_step = []

    def stats(self) -> EngineStats:
        return EngineStats(
            scheduler=self.scheduler.stats(),
            num_steps=self.num_steps,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            finished_by_reason=dict(self.finished_by_reason),
            expert_cache=self._expert_cache_stats(),
        )

    def _expert_cache_stats(self) -> Any:
        stats = getattr(getattr(self.executor.model, "experts", None), "stats", None)
        return None if stats is None else replace(stats)  # a snapshot: the cache's are live
