"""The two backends a scheduling benchmark runs its workload on (see ``harness``).

Both run the same ``Engine`` step loop (``run_workload``): ``SimBackend`` with a
``SimExecutor`` in virtual time, pricing each plan with ``LinearCostModel``;
``EngineBackend`` with the real model on this machine's CPU in wall-clock time
(a tiny seeded Llama by default). Both take the same ``WorkItem`` list and
``SchedParams`` and return a ``RunResult``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.bench.harness import ArrivalQueue, RequestRecord, RunResult, WorkItem
from tokenmill.core.plan import StepPlan
from tokenmill.core.request import SamplingParams

# ------------------------------------------------------------ cost model (sim)


@dataclass
class LinearCostModel:
    """Step time linear in the work of a plan (illustrative GPU-class defaults, not measured).

    ``step_s`` per step (launch and host overhead), ``token_s`` per batched
    token (the weight GEMMs), ``decode_ctx_s`` per KV token a decode row
    reads, ``prefill_pair_s`` per causal query-key pair of a prefill chunk.
    A multi-step plan costs its sub-steps summed.
    """

    step_s: float = 0.004
    token_s: float = 20e-6
    decode_ctx_s: float = 10e-9
    prefill_pair_s: float = 0.5e-9

    def plan_time(self, plan: StepPlan) -> float:
        total = 0.0
        for k in range(plan.num_steps):
            tokens = ctx = pairs = 0
            for s in plan.seqs:
                if k > 0 and not s.samples:
                    continue
                n = s.num_new_tokens if k == 0 else 1
                start = s.start_pos if k == 0 else s.start_pos + s.num_new_tokens + k - 1
                tokens += n
                if n == 1:
                    ctx += start + 1
                else:
                    pairs += n * start + n * (n + 1) // 2
            total += self.step_s + self.token_s * tokens + self.decode_ctx_s * ctx + self.prefill_pair_s * pairs
        return total

    def describe(self) -> str:
        return (
            f"linear cost model: {self.step_s * 1e3:g} ms/step + {self.token_s * 1e6:g} us/token + "
            f"{self.decode_ctx_s * 1e9:g} ns/decode KV token + {self.prefill_pair_s * 1e9:g} ns/prefill pair"
        )


# ----------------------------------------------------------------- backends


@dataclass
class SchedParams:
    """What a benchmark run varies; the rest comes from the command line."""

    num_blocks: int
    policy: str = "fcfs"
    policy_options: dict[str, Any] = field(default_factory=dict)
    enable_prefix_caching: bool = True


class SimBackend:
    """The engine's own step loop in virtual time: a ``SimExecutor`` priced by ``LinearCostModel``."""

    name = "sim"

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cost = LinearCostModel(
            step_s=args.step_ms / 1e3,
            token_s=args.token_us / 1e6,
            decode_ctx_s=args.decode_ctx_ns / 1e9,
            prefill_pair_s=args.prefill_pair_ns / 1e9,
        )

    def describe(self) -> str:
        return f"sim: the engine's step loop in virtual time, bench {self.cost.describe()}"

    def run(self, items: Sequence[WorkItem], params: SchedParams, label: str) -> RunResult:
        from tokenmill.engine import Engine, EngineConfig
        from tokenmill.executor.sim_executor import SimExecutor, VirtualClock

        args = self.args
        max_len = max(len(w.prompt) + w.output_len for w in items) + 1
        clock = VirtualClock(ArrivalQueue(items).start)
        executor = SimExecutor(self.cost, clock=clock, num_blocks=params.num_blocks, max_model_len=max_len)
        config = EngineConfig(
            block_size=args.block_size,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=params.enable_prefix_caching,
            max_decode_steps=1,  # one step per plan: arrivals are never overrun
            policy=params.policy,
            policy_options=dict(params.policy_options),
        )
        engine = Engine(config, clock, executor=executor)
        return run_workload(engine, items, label, self.name, clock.advance_to)


TINY_LLAMA = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
)  # fmt: skip
TINY_VOCAB = 512


def make_tiny_model(path: Path, seed: int = 0, vocab_size: int = TINY_VOCAB) -> Path:
    """A tiny Llama with seeded random weights and a word-level tokenizer, saved as a HF checkpoint."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, **TINY_LLAMA)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t0", pad_token="t0").save_pretrained(path)
    return path


class EngineBackend:
    """The real engine on this machine, requests added at their arrival times (wall clock)."""

    name = "engine"

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        # Multi-threaded CPU kernels collapse (100x slower steps, measured) when the
        # cores are shared with other busy processes; one thread is the honest default there.
        torch.set_num_threads(args.threads)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if args.model in (None, "tiny"):
            self._tmp = tempfile.TemporaryDirectory(prefix="tokenmill-bench-")
            self.model_dir = make_tiny_model(Path(self._tmp.name), seed=args.seed)
            self.model_desc = f"tiny random Llama {TINY_LLAMA} (seed {args.seed})"
        elif args.model == "default":
            from tokenmill.models import DEFAULT_MODEL_PATH

            self.model_dir = Path(DEFAULT_MODEL_PATH)
            self.model_desc = f"bundled default model ({self.model_dir})"
        else:
            self.model_dir = Path(args.model)
            self.model_desc = str(self.model_dir)
        cfg = json.loads((self.model_dir / "config.json").read_text())
        self.vocab_size = int(cfg["vocab_size"])
        self.max_model_len = int(cfg.get("max_position_embeddings", 2048))

    def describe(self) -> str:
        return (
            f"engine: tokenmill Engine, wall clock, {platform.machine()} CPU, {self.args.threads} torch thread(s), "
            f"float32, model: {self.model_desc}"
        )

    def run(self, items: Sequence[WorkItem], params: SchedParams, label: str) -> RunResult:
        from tokenmill.engine import Engine, EngineConfig
        from tokenmill.executor.model_executor import ModelExecutor
        from tokenmill.model.loader import read_model_config

        args = self.args
        bpb = ModelExecutor.kv_cache_bytes_per_block(
            read_model_config(self.model_dir), args.block_size, "float32"
        )
        engine = Engine(
            EngineConfig(
                model=str(self.model_dir),
                dtype="float32",
                kv_cache_memory=params.num_blocks * bpb,
                block_size=args.block_size,
                max_num_batched_tokens=args.max_num_batched_tokens,
                max_num_seqs=args.max_num_seqs,
                enable_prefix_caching=params.enable_prefix_caching,
                policy=params.policy,
                policy_options=dict(params.policy_options),
                max_decode_steps=args.max_decode_steps,
            ),
            clock=time.perf_counter,
        )
        # Warm up kernels outside the measurement, in a cache namespace no workload uses.
        engine.add_request("warmup", [1] * 32, SamplingParams(max_tokens=4, ignore_eos=True), cache_namespace="warmup")
        while engine.has_unfinished():
            engine.step()
        return run_workload(engine, items, label, self.name, lambda t: time.sleep(max(0.0, min(0.01, t - time.perf_counter()))))


def run_workload(
    engine: Any, items: Sequence[WorkItem], label: str, backend: str, wait_until: Callable[[float], None]
) -> RunResult:
    """Add each request at its arrival time on the engine's clock and step until all finish.

    The one loop of both backends: ``wait_until(t)`` passes the time to ``t``
    when nothing runs (sleeping on a wall clock, jumping a virtual one).
    """
    clock = engine.clock
    stats0 = engine.stats()
    by_id = {w.request_id: w for w in items}
    arrivals = ArrivalQueue(items)
    base = arrivals.start
    first: dict[str, float] = {}
    finish: dict[str, float] = {}
    cached: dict[str, int] = {}
    n_out: dict[str, int] = {}
    service: list[tuple[float, str, int]] = []
    wall0 = time.perf_counter()
    t0 = clock()
    while arrivals or engine.has_unfinished():
        now = clock() - t0
        for w in arrivals.due(now + base):
            engine.add_request(
                w.request_id,
                list(w.prompt),
                SamplingParams(temperature=0.0, max_tokens=w.output_len, ignore_eos=True),
                arrival_time=t0 + arrivals.arrival[w.request_id] - base,
                client_id=w.client_id,
                priority=w.priority,
                ttft_slo=w.ttft_slo,
                tpot_slo=w.tpot_slo,
                predicted_output_len=w.predicted_output_len,
            )
        if not engine.has_unfinished():
            nxt = arrivals.next_time()
            if nxt is not None:
                wait_until(t0 + nxt - base)
            continue
        for out in engine.step():
            t = clock() - t0
            w = by_id[out.request_id]
            new = sum(len(o.delta_token_ids) for o in out.outputs)
            served = new
            if out.request_id not in first:
                m = out.metrics
                first[out.request_id] = (m.first_token_time - t0) if m and m.first_token_time else t
                cached[out.request_id] = out.num_cached_tokens
                served += len(w.prompt)  # fair-share policies count the prompt with the first token
            n_out[out.request_id] = n_out.get(out.request_id, 0) + new
            service.append((t, w.client_id, served))
            if out.finished:
                m = out.metrics
                finish[out.request_id] = (m.finished_time - t0) if m and m.finished_time else t
                arrivals.finished(out.request_id, base + finish[out.request_id])
    end = clock() - t0
    stats = engine.stats()
    records = [
        RequestRecord(
            request_id=w.request_id,
            client_id=w.client_id,
            priority=w.priority,
            arrival=arrivals.arrival.get(w.request_id, w.arrival) - base,
            first_token=first.get(w.request_id),
            finish=finish.get(w.request_id),
            prompt_len=len(w.prompt),
            output_len=n_out.get(w.request_id, 0),
            cached_tokens=cached.get(w.request_id, 0),
            ttft_slo=w.ttft_slo,
            tpot_slo=w.tpot_slo,
        )
        for w in items
    ]
    return RunResult(
        label=label,
        backend=backend,
        records=records,
        duration=end,
        prefill_tokens=stats.num_prompt_tokens - stats0.num_prompt_tokens,
        num_preemptions=stats.scheduler.num_preemptions - stats0.scheduler.num_preemptions,
        service=service,
        wall_s=time.perf_counter() - wall0,
    )


def make_backend(args: argparse.Namespace) -> SimBackend | EngineBackend:
    return EngineBackend(args) if args.backend == "engine" else SimBackend(args)
