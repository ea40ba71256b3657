"""What a simulation is configured with, and what it returns.

``SimConfig`` holds one pool of replicas (``PoolConfig``: scheduler, cost
model, size, router), or a prefill and a decode pool for disaggregated
serving, plus the KV-transfer link and run-wide SLOs. ``SimResult`` is what
``simulator.simulate`` returns: the summary, per-request records, time series
and the simulator's own speed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tokenmill.core.scheduler import SchedulerConfig
from tokenmill.sim.cost_model import CostModel
from tokenmill.sim.metrics import LogHistogram, RequestRecords


@dataclass
class PoolConfig:
    """A set of identical replicas: their scheduler, cost model, size and router."""

    scheduler: SchedulerConfig
    cost_model: CostModel
    num_replicas: int = 1
    router: str = "round_robin"
    router_options: dict[str, Any] = field(default_factory=dict)
    gpus_per_replica: int = 1
    # Speculative decoding (the scheduler's num_speculative_tokens): the chance that a draft
    # token is accepted, a property of the workload and the proposer.
    spec_acceptance: float = 0.7


@dataclass
class SimConfig:
    pool: PoolConfig  # colocated replicas, or the decode pool when ``prefill_pool`` is set
    prefill_pool: PoolConfig | None = None
    mode: str = "ideal"  # ideal | engine (see the module docstring)
    kv_transfer_bandwidth: float = 50e9  # bytes/s per transfer (e.g. 400 Gb/s InfiniBand per GPU)
    kv_transfer_latency: float = 1e-3  # seconds per transfer
    kv_bytes_per_token: float = 0.0  # bytes of KV per prompt token that a transfer moves
    ttft_slo: float | None = None  # run-wide SLOs (else each request's own)
    tpot_slo: float | None = None
    num_samples: int = 400  # points of the KV-usage and queue-depth time series per replica
    token_id: int = 0  # the token the simulated executor samples
    record_plans: bool = False  # keep (replica, plan summary) per completed plan, for replay checks
    # Keep a request timeline (core.timeline) per replica for up to this many requests each (0: none).
    timeline_requests: int = 0
    # The front end of a real cluster (replayed by ``sim/cluster_replay.py``): when a routed
    # request reaches its replica, ``dispatch_time(request id, routing time)``, and when the
    # router hears of a finish, ``report_time(request id, finish time)``; None: at once.
    dispatch_time: Callable[[str, float], float] | None = None
    report_time: Callable[[str, float], float] | None = None
    idle_wake_delay: float = 0.0  # seconds an idle replica's step loop takes to plan after a request reaches it

    def __post_init__(self) -> None:
        if self.mode not in ("ideal", "engine"):
            raise ValueError(f"mode must be 'ideal' or 'engine', got {self.mode!r}")


@dataclass
class SimResult:
    summary: dict[str, Any]
    records: RequestRecords
    itl: LogHistogram
    replicas: list[dict[str, Any]]
    series: dict[str, list[float]]
    throughput_series: dict[str, list[float]]
    wall_time: float
    num_plans: int
    num_steps: int
    config: dict[str, Any]
    timelines: list[Any] = field(default_factory=list)  # core.timeline.Timeline per replica, when asked

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "config": self.config,
            "replicas": self.replicas,
            "series": self.series,
            "throughput_series": self.throughput_series,
            "sim": {"wall_time_s": self.wall_time, "num_plans": self.num_plans, "num_steps": self.num_steps,
                    "requests_per_wall_s": self.summary.get("completed", 0) / max(self.wall_time, 1e-9),
                    "steps_per_wall_s": self.num_steps / max(self.wall_time, 1e-9)},  # fmt: skip
        }



def pool_description(p: PoolConfig | None) -> dict[str, Any] | None:
    """A pool's settings as plain data, for a result's ``config``."""
    if p is None:
        return None
    s = p.scheduler
    return {
        "num_replicas": p.num_replicas,
        "router": p.router,
        "gpus_per_replica": p.gpus_per_replica,
        "cost_model": p.cost_model.describe(),
        "scheduler": {"num_blocks": s.num_blocks, "block_size": s.block_size, "max_num_seqs": s.max_num_seqs,
                      "max_num_batched_tokens": s.max_num_batched_tokens, "max_model_len": s.max_model_len,
                      "enable_prefix_caching": s.enable_prefix_caching, "enable_chunked_prefill": s.enable_chunked_prefill,
                      "max_decode_steps": s.max_decode_steps, "policy": s.policy},  # fmt: skip
    }
