"""The step loop: schedule -> execute -> update, with the real model and wall time.

``Engine`` owns one scheduler (the core), one model executor and the output
processor. It validates and tokenizes requests, fans ``n`` samples out into
core requests, and turns updates into ``RequestOutput``s. It has no thread of
its own: callers (``LLM``, the async server engine) call ``step()``.

Streaming a multi-step plan: a caller that sets ``Engine.on_partial`` gets
each sub-step's tokens as they are sampled (the executor reports them
through a callback), so a stream's inter-token gaps are decode steps, not
plans. Those provisional outputs are checked against each request's stop
rules with the same pure ``Request.check_output`` that ``update()`` applies
at the end of the plan, so nothing past a stop is published; the scheduling
state changes only in ``update()``, and a stop string found mid-plan finishes
its request right after it.

Prefill/decode disaggregation (``tokenmill/cluster/pd.py``) uses three more
doors. A request added with ``handoff=True`` runs to its first token and then
ends with finish reason ``handoff`` (unless that token ends it anyway), its KV
blocks held for export (``export_blocks``) until ``release_kv``. Another
engine takes it over with ``reserve_import`` (blocks for the KV it will
receive; the prefix cache's full blocks count as received) and then
``add_request(..., prior=PriorTokens(...))``: the request continues after the
tokens it has, with its imported KV computed.

LoRA adapters are registered by name (``add_lora``; ``remove_lora``) after the
executor has loaded and checked them; a request names its adapter
(``add_request(lora=...)``) and runs in that adapter's prefix-cache namespace.
If an executor can no longer load an adapter a plan needs (``LoraLoadError``),
the requests that need it are aborted, the adapter is unregistered, and the
rest of the plan runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tokenmill.core.kv_eviction import KVEviction
from tokenmill.core.lora import LoRARequest
from tokenmill.core.lora import cache_namespace as namespace_of
from tokenmill.core.plan import SeqUpdate, StepPlan, StepResult
from tokenmill.core.request import FinishReason, Request, SamplingParams
from tokenmill.core.scheduler import QueueFullError, Scheduler, SchedulerConfig, SchedulerStats
from tokenmill.core.spec import SpecStats
from tokenmill.core.timeline import Timeline
from tokenmill.executor import Executor
from tokenmill.lora.errors import LoraError, LoraLoadError
from tokenmill.lora.registry import LoraRegistry
from tokenmill.output_processor import OutputProcessor, PriorTokens
from tokenmill.outputs import RequestOutput

logger = logging.getLogger("tokenmill.engine")

__all__ = ["DEFAULT_EVICTION", "Engine", "EngineConfig", "EngineStats", "PriorTokens", "QueueFullError", "StepRecord"]

# ``Engine.add_request(kv_eviction=...)``: the engine's ``EngineConfig.kv_eviction`` (None: no eviction)
DEFAULT_EVICTION: Any = object()


def cli(help: str, kind: str = "str", **extra: Any) -> dict[str, Any]:
    """A field's command-line face: ``commands/engine_args.py`` makes ``--field-name`` from it.

    ``kind`` is one of ``str``, ``choice`` (with ``choices``), ``size`` (bytes,
    with units), ``positive`` (an int >= 1), ``bool`` (``--x/--no-x``),
    ``flag`` (``--x`` turns it on), ``key_value`` (repeatable ``KEY=VALUE``,
    collected into a dict), ``threads`` (``auto``, None, or an int >= 1); ``extra`` may give ``flag`` (another option
    name) and ``aliases`` (more option strings; ``--no-...`` aliases of a
    ``bool`` turn it off).
    """
    return {"cli": {"help": help, "kind": kind, **extra}}


@dataclass
class EngineConfig:
    """Everything an engine is built from; the one place its defaults are written.

    ``serve``, ``generate`` and ``LLM(**options)`` take these fields by name:
    a field with ``cli`` metadata is a command-line flag of both commands.
    """

    model: str | None = None  # a local HF directory; None: the bundled default model
    tokenizer: str | None = field(default=None, metadata=cli("tokenizer directory (default: the model's)"))
    dtype: str = field(default="auto", metadata=cli(
        "weights' dtype; int8 is weight-only quantization", "choice",
        choices=["auto", "float32", "bfloat16", "float16", "int8"]))
    device: str = field(default="cpu", metadata=cli("cpu, cuda, cuda:1 ... (auto: cuda if available)"))
    kv_cache_memory: int = field(default=1 << 30, metadata=cli("KV cache size, bytes or e.g. 512MiB, 4GiB", "size"))
    kv_cache_dtype: str = field(default="auto", metadata=cli(
        "how KV is stored: auto (the model's dtype), int8 or int4 (per-token scales; about 1.9x / 3.5x the "
        "tokens of bf16 KV in the same --kv-cache-memory); see model/kv_format.py", "choice",
        choices=["auto", "int8", "int4"]))  # model.kv_format.KV_CACHE_DTYPES, without importing torch
    # Every request's KV eviction unless it asks otherwise (core/kv_eviction.py); None: keep all KV.
    # Its flags (--kv-eviction, --kv-budget, ...) make one value: commands/options.py.
    kv_eviction: KVEviction | None = None
    # MoE models: bytes of RAM for experts, the rest memory-mapped (None: all experts in RAM)
    expert_cache_memory: int | None = field(default=None, metadata=cli(
        "MoE models: RAM for experts, e.g. 8GiB; the rest stay memory-mapped (default: every expert in RAM)",
        "size"))
    expert_prefetch: bool = field(default=True, metadata=cli(
        "MoE models with --expert-cache-memory: read the next layer's likely experts ahead", "bool"))
    block_size: int = field(default=16, metadata=cli("tokens per KV block", "positive"))
    max_num_batched_tokens: int = field(default=2048, metadata=cli("tokens per step", "positive"))
    max_num_seqs: int = field(default=64, metadata=cli("sequences per step", "positive"))
    # None: adapt to the cores the process gets (model/threads.py), up to torch's thread count
    threads: int | None = field(default=None, metadata=cli(
        "CPU kernel threads: auto uses torch's count and drops threads while other processes hold the "
        "cores; N fixes N threads (default: auto)", "threads"))
    max_model_len: int | None = field(default=None, metadata=cli("context length (default: the model's)", "positive"))
    enable_prefix_caching: bool = field(default=True, metadata=cli(
        "the radix prefix cache", "bool", aliases=["--no-prefix-caching"]))
    enable_chunked_prefill: bool = field(default=True, metadata=cli(
        "split long prompts over steps (off: a prompt is prefilled in one step)", "bool"))
    max_decode_steps: int = field(default=8, metadata=cli(
        "decode steps one plan may cover when nothing can change", "positive"))
    max_waiting: int | None = None  # serve's --max-queue (0 there means unbounded)
    # Running slots the n samples of one request keep while other requests wait for
    # one (None: no share); see core/scheduler.py.
    max_seqs_per_request: int | None = field(default=8, metadata=cli(
        "running slots the n samples of one request keep while other requests wait", "positive"))
    # Bound on n x max_tokens of one request (max_tokens=None counts as the rest of
    # the context); None: no bound.
    max_tokens_per_request: int | None = field(default=None, metadata=cli(
        "refuse requests whose n x max_tokens exceeds this (default: no bound)", "positive"))
    # LoRA: adapters resident (and running) at once, LRU unloaded beyond; the largest rank
    max_loras: int = field(default=4, metadata=cli(
        "LoRA adapters resident (and running) at once; least recently used idle ones are unloaded", "positive"))
    max_lora_rank: int = field(default=16, metadata=cli("largest LoRA rank accepted", "positive"))
    policy: str = field(default="fcfs", metadata=cli("scheduling policy", "policy"))
    policy_options: dict[str, Any] = field(default_factory=dict, metadata=cli(
        "an option of the policy (repeatable; VALUE parsed as JSON when it is)", "key_value",
        flag="--policy-option"))
    # Structured-output JSON without free whitespace unless a request asks for it (vLLM's
    # disable_any_whitespace): small models fill free whitespace without end.
    structured_disable_any_whitespace: bool = field(default=False, metadata=cli(
        "structured-output JSON without free whitespace unless a request asks for it "
        "(small models tend to fill free whitespace without end)", "flag", flag="--disable-any-whitespace"))
    debug_checks: bool = field(default=False, metadata=cli("check the scheduler's invariants every step", "flag"))
    record_steps: bool = False  # keep a StepRecord per step (for replay in the simulator)
    # Keep a request timeline (core.timeline; written by --trace-file) for up to this many
    # requests (0: none); later requests are not recorded, so memory stays bounded.
    timeline_requests: int = 0
    # Speculative decoding (tokenmill/spec, core/spec.py): ngram | draft:PATH | draft:default
    # | self-int8; None: off. ``num_speculative_tokens``: K drafts per step, or None for
    # "auto" (chosen per request and step, up to spec.AUTO_MAX_TOKENS).
    speculative: str | None = None
    num_speculative_tokens: int | None = None
    # Tokens per step past which a step is compute bound (speculation backs off there).
    speculative_knee_tokens: int = 16

    def __post_init__(self) -> None:
        from tokenmill.spec import parse_num_speculative_tokens, parse_speculative

        if self.speculative is None and self.num_speculative_tokens == 0:
            self.num_speculative_tokens = None  # 0 drafts: off, as SchedulerConfig writes it
        if self.speculative is not None:
            parse_speculative(self.speculative)
        if self.num_speculative_tokens is not None:
            parse_num_speculative_tokens(self.num_speculative_tokens)
            if self.speculative is None:
                raise ValueError("num_speculative_tokens needs a speculative method (speculative=...)")

    def scheduler_config(self, num_blocks: int, max_model_len: int, draft_cost: float = 0.0) -> SchedulerConfig:
        """The scheduler's share of this config: every ``SchedulerConfig`` field, by name
        (speculative decoding's resolved from ``speculative`` and ``num_speculative_tokens``)."""
        from tokenmill.spec import AUTO_MAX_TOKENS

        shared = {f.name: getattr(self, f.name) for f in fields(SchedulerConfig) if hasattr(self, f.name)}
        shared.update(num_blocks=num_blocks, max_model_len=max_model_len, policy_options=dict(self.policy_options))
        k = self.num_speculative_tokens
        shared.update(
            num_speculative_tokens=0 if self.speculative is None else (k or AUTO_MAX_TOKENS),
            speculative_adaptive=k is None,
            speculative_draft_cost=draft_cost,
        )
        return SchedulerConfig(**shared)


@dataclass
class StepRecord:
    step_id: int
    added_before: list[str]  # core request ids added since the previous step
    summary: tuple
    duration: float
    start: float = 0.0  # the engine clock when the plan was made


@dataclass
class EngineStats:
    scheduler: SchedulerStats
    num_steps: int
    num_prompt_tokens: int
    num_generation_tokens: int
    finished_by_reason: dict[str, int]
    # Speculative decoding: verified drafts, and the seconds of execution spent proposing.
    spec: SpecStats | None = None
    draft_seconds: float = 0.0
    execute_seconds: float = 0.0

    @property
    def draft_time_share(self) -> float:
        return self.draft_seconds / self.execute_seconds if self.execute_seconds > 0 else 0.0
    # counters of an offloaded MoE model's expert cache (model.expert_cache.ExpertCacheStats)
    expert_cache: Any = None


def resolve_model_path(model: str | None) -> str:
    if model is not None:
        return str(model)
    from tokenmill.models import DEFAULT_MODEL_PATH

    return str(DEFAULT_MODEL_PATH)


class Engine:
    """The step loop around one scheduler, one executor and the output processor.

    ``executor`` defaults to a ``ModelExecutor`` built from ``config`` (and then
    ``tokenizer`` to the model's); any ``Executor`` will do (``executor/``):
    with a ``SimExecutor`` and its ``VirtualClock`` as ``clock`` the same loop
    runs in virtual time, as the scheduling benchmarks and the replay recorder
    use it. Without a tokenizer, prompts are token ids and outputs carry no text.
    """

    def __init__(
        self,
        config: EngineConfig,
        clock: Callable[[], float] = time.monotonic,
        *,
        executor: Executor | None = None,
        tokenizer: Any = None,
    ) -> None:
        if config.max_tokens_per_request is not None and config.max_tokens_per_request < 1:
            raise ValueError(f"max_tokens_per_request must be >= 1 or None, got {config.max_tokens_per_request}")
        self.config = config
        self.clock = clock
        self.model_path = resolve_model_path(config.model)
        if executor is None:
            from tokenmill.executor.model_executor import ModelExecutor

            executor = ModelExecutor.from_config(config)
            if tokenizer is None:
                from tokenmill.tokenizer import load_tokenizer

                tokenizer = load_tokenizer(config.tokenizer or self.model_path)
        self.executor = executor
        self.model_config = getattr(executor, "model_config", None)
        self.tokenizer = tokenizer
        self.max_model_len = min(config.max_model_len or executor.max_model_len, executor.max_model_len)
        eos = set(executor.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.vocab_size = executor.vocab_size
        if config.kv_eviction is not None:
            self.check_kv_eviction()
        draft_cost = getattr(executor, "draft_cost", None)
        if config.speculative is not None and draft_cost is None:
            raise ValueError(f"speculative={config.speculative!r} but the executor proposes no drafts")
        sched_config = config.scheduler_config(executor.num_blocks, self.max_model_len, draft_cost or 0.0)
        sched_config.kv_window = getattr(executor, "kv_window", None)  # a model fact, like num_blocks
        self.scheduler = Scheduler(sched_config)
        if config.timeline_requests:
            self.scheduler.timeline = Timeline("engine", max_requests=config.timeline_requests)
        self.outputs = OutputProcessor(self.tokenizer)
        # Set by a caller that streams (the async engine): see the module docstring.
        self.on_partial: Callable[[list[RequestOutput]], None] | None = None
        self._children: dict[str, list[Request]] = {}
        self._handoff: dict[str, int | None] = {}  # handoff request id -> the max_tokens it was asked with
        self._grammar_compiler: Any = None  # tokenmill.structured.compiler.GrammarCompiler, made on first use
        self._grammar_lock = threading.Lock()
        self._added_since_step: list[str] = []
        self.step_log: list[StepRecord] = []
        self.loras = LoraRegistry()
        self.num_steps = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.finished_by_reason: dict[str, int] = {}
        self.draft_seconds = 0.0
        self.execute_seconds = 0.0

    # ---------------------------------------------------------------- adapters

    def add_lora(self, name: str, path: str) -> LoRARequest:
        """Register the PEFT adapter at ``path`` as ``name``, loading and checking it first.

        Raises ``LoraError`` (a name in use, a malformed directory, an adapter for another
        base model, a rank over ``max_lora_rank``); nothing is registered then.
        """
        lora = self.loras.new(name, path)
        add = getattr(self.executor, "add_lora", None)
        if add is not None:
            add(lora)
        self.loras.add(lora)
        return lora

    def remove_lora(self, name: str) -> LoRARequest:
        """Unregister adapter ``name`` (``LoraNotFoundError`` if unknown). Requests already
        running with it finish with it; new ones cannot name it."""
        lora = self.loras.remove(name)
        remove = getattr(self.executor, "remove_lora", None)
        if remove is not None:
            remove(lora.lora_int_id)
        return lora

    def resolve_lora(self, lora: LoRARequest | str | None) -> LoRARequest | None:
        """The registered adapter a request asks for: a name, or a ``LoRARequest`` (registered
        under its name on first use, as vLLM's offline API takes one); None for the base."""
        if lora is None:
            return None
        if isinstance(lora, str):
            return self.loras.get(lora)
        if lora.lora_name in self.loras:
            known = self.loras.get(lora.lora_name)
            if str(Path(lora.lora_path).expanduser().resolve()) != known.lora_path:
                raise LoraError(
                    f"LoRA adapter {lora.lora_name!r} is loaded from {known.lora_path}, not {lora.lora_path}"
                )
            return known
        return self.add_lora(lora.lora_name, lora.lora_path)

    # ---------------------------------------------------------------- inputs

    @property
    def grammar_compiler(self) -> Any:
        """The structured-output compiler for this engine's tokenizer (built on first use;
        the server calls it from its threads, so requests arrive compiled)."""
        if self._grammar_compiler is None:
            if self.tokenizer is None:
                raise ValueError("structured outputs need a tokenizer, and this engine has none")
            with self._grammar_lock:
                if self._grammar_compiler is None:
                    from tokenmill.structured.compiler import GrammarCompiler

                    self._grammar_compiler = GrammarCompiler(
                        self.tokenizer, self.vocab_size, self.eos_token_ids,
                        disable_any_whitespace=self.config.structured_disable_any_whitespace,
                    )  # fmt: skip
        return self._grammar_compiler

    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer: give the prompt as token ids")
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
        lora: LoRARequest | str | None = None,
        handoff: bool = False,
        prior: PriorTokens | None = None,
        kv_eviction: KVEviction | None = DEFAULT_EVICTION,
    ) -> list[int]:
        """Validate and queue a request; returns its prompt token ids.

        ``lora``: the adapter it runs with (a registered name or a ``LoRARequest``; an
        unknown name raises ``LoraNotFoundError``). ``cache_namespace`` is its cache salt.
        ``handoff``: stop after the first token and hold the KV for another
        engine; ``prior``: the tokens the request already generated on another
        engine (see the module docstring; both take one sample and no prompt
        logprobs). ``kv_eviction`` bounds the request's KV
        (``core/kv_eviction.py``); by default the engine's
        ``EngineConfig.kv_eviction``, None for no bound.

        Raises ``ValueError`` (bad input, named) or ``QueueFullError``; on
        either, nothing of the request is left behind (nor a KV reservation
        of its id).
        """
        try:
            return self._add_request(request_id, prompt, params, arrival_time, client_id, priority, ttft_slo,
                                     tpot_slo, cache_namespace, predicted_output_len, lora, handoff, prior, kv_eviction)  # fmt: skip
        except (ValueError, QueueFullError):
            if request_id not in self._children:
                self.scheduler.cancel_import(request_id)
            raise

    def _add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None,
                     arrival_time: float | None, client_id: str, priority: int, ttft_slo: float | None,
                     tpot_slo: float | None, cache_namespace: str, predicted_output_len: int | None,
                     lora: LoRARequest | str | None, handoff: bool, prior: PriorTokens | None,
                     kv_eviction: KVEviction | None) -> list[int]:  # fmt: skip
        params = params or SamplingParams()
        params.validate()
        if (handoff or prior is not None) and (params.n != 1 or params.prompt_logprobs is not None):
            raise ValueError("a request handed between engines takes one sample (n=1) and no prompt logprobs")
        if handoff and prior is not None:
            raise ValueError("a request is either handed off after its first token or continues prior tokens")
        if kv_eviction is DEFAULT_EVICTION:
            kv_eviction = self.config.kv_eviction
        if kv_eviction is not None:
            self.check_kv_eviction()
        if params.structured_outputs is not None:
            # A cache hit when the server compiled it already; a GrammarError (ValueError) if bad.
            bound = self.grammar_compiler.compile(params.structured_outputs)
            if bound is not params.structured_outputs:
                params = replace(params, structured_outputs=bound)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this engine has none")
        if request_id in self._children:
            raise ValueError(f"request id {request_id!r} is already in use")
        adapter = self.resolve_lora(lora)
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
        done = list(prior.token_ids) if prior is not None else []
        if done and len(prompt_ids) + len(done) >= self.max_model_len:
            raise ValueError(f"the prompt and the {len(done)} tokens generated so far fill the context")
        limit = self.config.max_tokens_per_request
        if limit is not None:
            per_sample = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(prompt_ids)
            if params.n * per_sample > limit:
                raise ValueError(
                    f"the request asks for up to n x max_tokens = {params.n} x {per_sample} = "
                    f"{params.n * per_sample} tokens; max_tokens_per_request is {limit}: lower n or max_tokens"
                )
        arrival = self.clock() if arrival_time is None else arrival_time
        namespace = namespace_of(cache_namespace, adapter)
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1:
                # The samples keep the request's seed: the sampler keys each sample's stream by
                # (seed, sample index), so seeded samples differ, stay reproducible, and never
                # collide with another request's seed (as seed + i would).
                child_params = replace(params, n=1)
                if i > 0:
                    child_params.prompt_logprobs = None  # the samples share one prompt: sample 0 computes them
            if handoff:
                # The first token only, sampled as the request asked (min_tokens masks EOS alike).
                child_params = replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1))
            children.append(
                Request(
                    request_id=request_id if params.n == 1 else f"{request_id}#{i}",
                    prompt_token_ids=prompt_ids,
                    sampling_params=child_params,
                    arrival_time=arrival,
                    eos_token_ids=self.eos_token_ids,
                    client_id=client_id,
                    cache_namespace=namespace,
                    priority=priority,
                    ttft_slo=ttft_slo,
                    tpot_slo=tpot_slo,
                    predicted_output_len=predicted_output_len,
                    parent_id=request_id,
                    sample_index=i,
                    hold_kv=handoff,
                    kv_eviction=kv_eviction,
                    lora=adapter,
                )
            )
            children[-1].output_token_ids.extend(done)
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
        if handoff:
            self._handoff[request_id] = params.max_tokens
        self._added_since_step.extend(c.request_id for c in children)
        self.outputs.add(request_id, text, prompt_ids, children, arrival, prior)
        return prompt_ids

    def check_kv_eviction(self) -> None:
        """Refuse KV eviction where this engine cannot do it (``ValueError``)."""
        cfg = self.model_config
        if cfg is not None and any(cfg.layer_windows):
            # eviction compacts KV entries out of position order; a window is a range of positions
            raise ValueError("KV eviction is not supported for models with sliding-window layers")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Abort a user request (all its samples); its blocks are freed now."""
        children = self._children.pop(request_id, None)
        if children is None:
            return None
        self._handoff.pop(request_id, None)  # an aborted request's blocks are freed, not held
        now = self.clock()
        for child in children:
            if self.scheduler.abort_request(child.request_id, now) is not None:
                self.finished_by_reason["abort"] = self.finished_by_reason.get("abort", 0) + 1
        return self.outputs.finish_aborted(request_id)

    # ------------------------------------------------------ KV between engines

    def reserve_import(
        self, request_id: str, token_ids: list[int], num_tokens: int, cache_namespace: str = ""
    ) -> tuple[int, list[int]] | None:
        """Reserve blocks for the KV of the first ``num_tokens`` of ``token_ids`` (a request
        that will be added under ``request_id``, continuing those tokens).

        Returns (tokens the prefix cache already holds, the fresh blocks to write
        the KV of the rest into), or None when the blocks are not there (the
        request is then added plainly and recomputes). ``cancel_import`` gives
        a reservation back; adding the request takes it.
        """
        if request_id in self._children:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = Request(request_id, list(token_ids), SamplingParams(max_tokens=1), cache_namespace=cache_namespace)
        return self.scheduler.reserve_import(req, num_tokens)

    def cancel_import(self, request_id: str) -> bool:
        return self.scheduler.cancel_import(request_id)

    def export_blocks(self, request_id: str, start_token: int, end_token: int) -> list[int]:
        """The blocks holding tokens ``[start_token, end_token)`` of a handed-off request."""
        return self.scheduler.kv.export_blocks(request_id, start_token, end_token)

    def release_kv(self, request_id: str) -> bool:
        """Free the blocks a handed-off request held for export (full ones stay cached)."""
        return self.scheduler.release_kv(request_id)

    # ------------------------------------------------------------------ step

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one plan; return an output for every user request that advanced.

        With ``on_partial`` set, a multi-step plan streams: after each sub-step but
        the last, ``on_partial`` gets the outputs of the requests that sampled a
        token in it (see the module docstring); what it got is not returned again.
        """
        plan = self.scheduler.schedule(self.clock())
        if plan.is_empty:
            if plan.finished_ids:
                self.executor.execute(plan)  # only to drop the finished requests' state
            return []
        sink = self.on_partial
        publisher = _Publisher(self, plan)
        streaming = sink is not None and plan.num_steps > 1
        t0 = self.clock()
        result, lost = self._execute(plan, publisher.substep(sink) if streaming else None)
        result.duration = self.clock() - t0
        self.execute_seconds += result.duration
        if result.draft_time > 0.0:
            self.draft_seconds += result.draft_time
            self._measure_draft_cost(plan, result.duration, result.draft_time)
        self._record(plan, result.duration)
        outputs = publisher.publish(result.sampled_token_ids, result.logprobs, result.prompt_logprobs)
        result.stop_strings = publisher.stop_strings or None
        for u in self.scheduler.update(plan, result):
            self.num_generation_tokens += len(u.new_token_ids)
        self.num_prompt_tokens += sum(s.num_new_tokens for s in plan.seqs if s.is_prefill)
        if self._handoff:
            self._settle_handoffs(publisher, outputs)
        for out in publisher.finished + [o for o in outputs if o.finished]:
            self._children.pop(out.request_id, None)
            for o in out.outputs:
                reason = o.finish_reason or "stop"
                self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1
        return lost + outputs

    def _execute(self, plan: StepPlan, on_substep: Callable[..., None] | None) -> tuple[StepResult, list[RequestOutput]]:
        """Run ``plan``; if adapters it needs cannot be loaded, abort their requests, unregister
        those adapters and run the rest (``update`` skips the aborted). Returns the result and
        the aborted requests' outputs."""
        lost: list[RequestOutput] = []
        run = plan
        while True:
            try:
                return self.executor.execute(run, on_substep) if on_substep else self.executor.execute(run), lost
            except LoraLoadError as exc:
                self.loras.drop_ids(set(exc.lora_ids))
                gone = set(exc.request_ids)
                if not gone:
                    raise
                parents = {self.scheduler.requests[r].parent_id or r for r in gone if r in self.scheduler.requests}
                for parent in parents:
                    out = self.abort_request(parent)
                    if out is not None:
                        lost.append(out)
                logger.error("aborted %d request(s): %s", len(parents), exc)
                run = replace(run, seqs=[s for s in run.seqs if s.request_id not in gone])

    def _measure_draft_cost(self, plan: StepPlan, duration: float, draft_time: float) -> None:
        """Keep the controller's draft cost (one draft step over one target step) measured:
        a small model's steps cost their per-call overhead more than their bytes."""
        steps = max(s.num_propose for s in plan.seqs)
        target = duration - draft_time
        if steps <= 0 or target <= 0.0:
            return
        cfg = self.scheduler.spec.config
        cfg.draft_cost += 0.1 * (draft_time / steps / target - cfg.draft_cost)
    def _settle_handoffs(self, publisher: _Publisher, outputs: list[RequestOutput]) -> None:
        """Hand off the requests whose first token did not end them; free the KV of those
        it did end (nobody will export it)."""
        for rid in publisher.handoffs:
            out = next((o for o in outputs if o.request_id == rid), None)
            handed = self.outputs.hand_off(rid, out)
            if handed is not None and out is None:
                outputs.append(handed)
        for out in publisher.finished + outputs:
            if out.finished and out.request_id in self._handoff:
                del self._handoff[out.request_id]
                if out.outputs[0].finish_reason != "handoff":
                    self.scheduler.release_kv(out.request_id)

    def _record(self, plan: StepPlan, duration: float) -> None:
        self.num_steps += 1
        if self.config.record_steps:
            self.step_log.append(StepRecord(plan.step_id, self._added_since_step, plan.summary(), duration, plan.now))
        self._added_since_step = []

    def stats(self) -> EngineStats:
        return EngineStats(
            scheduler=self.scheduler.stats(),
            num_steps=self.num_steps,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            finished_by_reason=dict(self.finished_by_reason),
            spec=replace(self.scheduler.spec.stats) if self.scheduler.spec.config.enabled else None,
            draft_seconds=self.draft_seconds,
            execute_seconds=self.execute_seconds,
            expert_cache=self._expert_cache_stats(),
        )

    def _expert_cache_stats(self) -> Any:
        stats = getattr(getattr(getattr(self.executor, "model", None), "experts", None), "stats", None)
        return None if stats is None else replace(stats)  # a snapshot: the cache's are live


class _Publisher:
    """Turns a plan's sampled tokens into outputs before ``update`` (``Engine.step``).

    It reads requests and never changes them: each sequence's tokens so far go
    through ``Request.check_output`` (the stop rules ``update()`` applies) and
    the output processor (detokenization, stop strings); what it found of stop
    strings goes to ``update`` in the step result. A streaming caller gets a
    publish after each sub-step of a multi-step plan (``substep``); the end of
    the plan publishes the rest.
    """

    def __init__(self, engine: Engine, plan: StepPlan) -> None:
        self.engine = engine
        self.plan = plan
        self.published: dict[str, int] = {}  # request id -> tokens of this plan handed out
        self.stop_strings: dict[str, tuple[int, str]] = {}  # request id -> (tokens taken, stop string)
        self.finished: list[RequestOutput] = []  # outputs that finished in a sub-step publish
        self.handoffs: list[str] = []  # handoff requests whose first token did not end them

    def substep(self, sink: Callable[[list[RequestOutput]], None]) -> Callable[..., None]:
        def on_substep(sampled: dict[str, list[int]], logprobs: dict[str, list[Any]]) -> None:
            outputs = self.publish(sampled, logprobs or None, None)
            self.finished.extend(out for out in outputs if out.finished)
            if outputs:
                sink(outputs)

        return on_substep

    def publish(
        self,
        sampled: dict[str, list[int]],
        logprobs: dict[str, list[Any]] | None,
        prompt_logprobs: dict[str, Any] | None,
    ) -> list[RequestOutput]:
        engine = self.engine
        requests = engine.scheduler.requests
        max_len = engine.max_model_len
        updates: list[SeqUpdate] = []
        before: dict[str, int] = {}  # request id -> tokens of the plan published before this call
        for s in self.plan.seqs:
            rid = s.request_id
            req = requests.get(rid)
            if req is None:
                continue
            plp = prompt_logprobs.get(rid) if prompt_logprobs else None
            if not s.samples:
                if plp is not None:
                    updates.append(SeqUpdate(req, [], prompt_logprobs=plp))
                continue
            if rid in self.stop_strings:
                continue  # a stop string ended it in an earlier sub-step
            toks = sampled[rid]
            done = self.published.get(rid, 0)
            n, reason, stop_reason = req.check_output(toks, max_len)
            if n <= done:
                continue  # stopped in an earlier sub-step
            if reason is FinishReason.LENGTH and rid in engine._handoff:
                # Only the handoff's one-token cap ends it: the client sees a request that goes on.
                asked = engine._handoff[rid]
                if (asked is None or req.num_output_tokens + n < asked) and req.num_tokens + n < max_len:
                    reason = None
                    self.handoffs.append(rid)
            before[rid] = done
            self.published[rid] = n
            lps = logprobs.get(rid) if logprobs else None
            updates.append(SeqUpdate(req, toks[done:n], lps[done:n] if lps else None, reason is not None,
                                     reason, stop_reason, plp))  # fmt: skip
        if not updates:
            return []
        outputs, stopped = engine.outputs.process(updates, engine.clock())
        for rid, stop, taken in stopped:
            self.published[rid] = n = before[rid] + taken
            self.stop_strings[rid] = (n, stop)
        return outputs
