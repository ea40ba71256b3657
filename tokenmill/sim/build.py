"""Assemble a simulation from plain options: cost model, scheduler config, pools, workload.

The CLI (``tokenmill sim``), the search and the benchmarks all build their
runs here, so that a flag means the same thing everywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.core.scheduler import SchedulerConfig
from tokenmill.sim import workload as W
from tokenmill.sim.cost_model import CostModel, knee_tokens
from tokenmill.sim.hardware import get_hardware, with_overrides
from tokenmill.sim.model_spec import ModelShape, kv_value_bytes
from tokenmill.sim.profiled import ProfiledCostModel
from tokenmill.sim.roofline import RooflineCostModel


@dataclass
class DeploymentSpec:
    """One kind of replica: model, hardware, parallelism, cost model and scheduler limits."""

    model: str = "llama-3-8b"  # built-in shape name, config.json or checkpoint directory
    hardware: str = "h100"
    tp: int = 1
    dtype: str = "bf16"
    kv_dtype: str | None = None
    cost_model: str = "roofline"  # roofline | profiled
    profile: str | None = None  # profile table for "profiled" (and the CPU's peaks for "cpu")
    step_overhead: float | None = None
    flops_efficiency: float | None = None
    bandwidth_efficiency: float | None = None
    block_size: int = 16
    num_blocks: int | None = None  # default: what fits in device memory, or in kv_cache_memory when profiled
    kv_cache_memory: int = 1 << 30  # bytes of KV cache of a profiled (real-engine) replica, as EngineConfig's
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_decode_steps: int = 1024
    policy: str = "fcfs"
    policy_options: dict[str, Any] = field(default_factory=dict)
    # Speculative decoding: drafts per step (0: off; adaptive up to that many unless fixed),
    # one draft step's cost over a target decode step, and the knee (None: from the cost model).
    num_speculative_tokens: int = 0
    speculative_adaptive: bool = True
    draft_cost: float = 0.05
    spec_knee_tokens: int | None = None
    max_loras: int | None = None  # distinct LoRA adapters running at once (None: no bound)
    lora_rank: int = 16  # the adapters' rank, as the roofline prices them (on all seven projections)


def make_cost_model(spec: DeploymentSpec) -> tuple[CostModel, ModelShape | None, dict[str, Any]]:
    """The cost model, the model shape (when known) and facts from the profile (when profiled)."""
    cm, shape, facts = _make_cost_model(spec)
    if spec.num_speculative_tokens:
        cm.draft_cost = spec.draft_cost
    return cm, shape, facts


def _make_cost_model(spec: DeploymentSpec) -> tuple[CostModel, ModelShape | None, dict[str, Any]]:
    if spec.cost_model == "profiled":
        if not spec.profile:
            raise ValueError("the profiled cost model needs --profile PATH (write one with `tokenmill profile`)")
        cm = ProfiledCostModel.load(spec.profile)
        shape = None
        cfg = cm.table.get("model", {}).get("config")
        if cfg:
            shape = ModelShape.from_hf_config(cfg, name=cm.table["model"].get("name", ""))
        return cm, shape, {**cm.table.get("engine", {}), "dtype": cm.table.get("dtype")}
    if spec.cost_model != "roofline":
        raise ValueError(f"unknown cost model {spec.cost_model!r}; use roofline or profiled")
    shape = ModelShape.load(spec.model)
    hw = get_hardware(spec.hardware, spec.profile if spec.hardware == "cpu" else None)
    hw = with_overrides(hw, step_overhead=spec.step_overhead, flops_efficiency=spec.flops_efficiency,
                        bandwidth_efficiency=spec.bandwidth_efficiency)  # fmt: skip
    return RooflineCostModel(shape, hw, tp=spec.tp, dtype=spec.dtype, kv_dtype=spec.kv_dtype,
                             lora_rank=spec.lora_rank), shape, {}  # fmt: skip


def make_scheduler_config(spec: DeploymentSpec, cm: CostModel, shape: ModelShape | None,
                          engine: dict[str, Any]) -> SchedulerConfig:  # fmt: skip
    num_blocks = spec.num_blocks
    if num_blocks is None:
        if isinstance(cm, RooflineCostModel):
            num_blocks = cm.num_kv_blocks(spec.block_size, spec.gpu_memory_utilization)
        elif shape is not None:
            # A profiled replica is the real engine: its KV holds kv_cache_memory bytes.
            itemsize: float = {"float32": 4, "float16": 2, "bfloat16": 2}.get(str(engine.get("dtype", "float32")), 4)
            if spec.kv_dtype:  # the engine's --kv-cache-dtype
                itemsize = kv_value_bytes(spec.kv_dtype, shape.head_dim)
            num_blocks = spec.kv_cache_memory // (shape.kv_bytes_per_token(itemsize) * spec.block_size)
        else:
            raise ValueError("give --num-blocks: the cost model does not say how much KV memory there is")
    max_len = spec.max_model_len or (shape.max_model_len if shape else int(engine.get("max_model_len", 2048)))
    return SchedulerConfig(
        num_blocks=num_blocks,
        block_size=spec.block_size,
        max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens,
        max_model_len=max_len,
        enable_prefix_caching=spec.enable_prefix_caching,
        enable_chunked_prefill=spec.enable_chunked_prefill,
        max_decode_steps=spec.max_decode_steps,
        max_loras=spec.max_loras,
        policy=spec.policy,
        policy_options=dict(spec.policy_options),
        num_speculative_tokens=spec.num_speculative_tokens,
        speculative_adaptive=spec.speculative_adaptive,
        speculative_draft_cost=spec.draft_cost,
        speculative_knee_tokens=spec.spec_knee_tokens or (knee_tokens(cm) if spec.num_speculative_tokens else 16),
        kv_window=shape.sliding_window if shape and shape.sliding_window and
        shape.num_sliding_layers == shape.num_layers else None,  # fmt: skip
    )


def kv_bytes_per_token(spec: DeploymentSpec, shape: ModelShape | None) -> float:
    """Whole-model KV bytes per token, what a prefill-to-decode transfer moves."""
    if shape is None:
        return 0.0
    return float(shape.kv_bytes_per_token(kv_value_bytes(spec.kv_dtype or spec.dtype, shape.head_dim)))


@dataclass
class WorkloadSpec:
    kind: str = "synthetic"  # synthetic | azure | jsonl | mix
    num_requests: int = 1000
    rate: float = 1.0
    arrival: str = "poisson"  # poisson | gamma | constant | trace (azure, jsonl)
    cv: float = 1.0
    prompt_len: str = "lognormal:1000,0.8"
    output_len: str = "lognormal:200,0.8"
    shared_prefix_groups: int = 0
    shared_prefix_len: int = 0
    path: str | None = None  # azure CSV, JSONL trace or mix JSON
    time_scale: float = 1.0
    start: float = 0.0
    slo_class: str = ""
    seed: int = 0


def make_workload(ws: WorkloadSpec, vocab_size: int, max_model_len: int | None) -> W.Workload:
    if ws.kind == "synthetic":
        wl = W.synthetic(ws.num_requests, ws.rate, ws.prompt_len, ws.output_len, ws.arrival, ws.cv,
                         ws.shared_prefix_groups, ws.shared_prefix_len, vocab_size, ws.seed,
                         slo_class=ws.slo_class)  # fmt: skip
    elif ws.kind == "azure":
        arrival = "trace" if ws.arrival in ("trace", "") else ws.arrival
        wl = W.from_azure_csv(ws.path, ws.num_requests or None, arrival, ws.rate, ws.time_scale, vocab_size,
                              ws.seed, ws.start)  # fmt: skip
    elif ws.kind == "jsonl":
        if not ws.path:
            raise ValueError("a JSONL workload needs --trace PATH")
        wl = W.from_jsonl(ws.path, vocab_size, ws.time_scale)
        if ws.num_requests and ws.num_requests < len(wl.requests):
            wl.requests = wl.requests[: ws.num_requests]
    elif ws.kind == "mix":
        if not ws.path:
            raise ValueError("a mix workload needs --mix PATH (JSON)")
        cfg = json.loads(Path(ws.path).read_text())
        wl = W.from_mix(cfg, vocab_size, ws.seed)
    else:
        raise ValueError(f"unknown workload {ws.kind!r}; use synthetic, azure, jsonl or mix")
    if ws.slo_class and ws.kind != "synthetic":
        ttft, tpot = W.SLO_CLASSES[ws.slo_class]["ttft"], W.SLO_CLASSES[ws.slo_class]["tpot"]
        for r in wl.requests:
            if r.ttft_slo is None:
                r.ttft_slo, r.tpot_slo, r.slo_class = ttft, tpot, ws.slo_class
    if max_model_len:
        wl.clip(max_model_len)
    return wl
