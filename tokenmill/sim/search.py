"""``tokenmill sim search``: the deployment that serves the most requests per second per GPU within SLOs.

For each candidate (N colocated replicas, or P prefill + D decode replicas
with prefill/decode disaggregation) the search finds, by bracketing and
bisection on the Poisson arrival rate, the highest rate at which at least
``attainment`` of the requests meet both the TTFT and the TPOT SLO. Goodput
per GPU is that rate divided by the candidate's GPUs (DistServe's measure).
Every trial is a full twin run of the same workload shape (same lengths,
same seed) at a different rate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenmill.sim import workload as W
from tokenmill.sim.build import (
    DeploymentSpec,
    kv_bytes_per_token,
    make_cost_model,
    make_scheduler_config,
)
from tokenmill.sim.config import PoolConfig, SimConfig
from tokenmill.sim.simulator import simulate


@dataclass
class SearchSpec:
    deployment: DeploymentSpec
    prefill_deployment: DeploymentSpec | None = None  # defaults to ``deployment``
    ttft_slo: float = 2.0
    tpot_slo: float = 0.1
    attainment: float = 0.9
    max_replicas: int = 8  # replicas in a candidate, prefill and decode together
    colocated: bool = True
    disaggregated: bool = True
    num_requests: int = 1000
    prompt_len: str = "azure"
    output_len: str = "azure"
    router: str = "least_outstanding_tokens"
    kv_transfer_bandwidth: float = 50e9
    kv_transfer_latency: float = 1e-3
    rate_tolerance: float = 0.05  # stop bisecting when the bracket is this tight (relative)
    seed: int = 0


def _pool(spec: DeploymentSpec, n: int, router: str) -> tuple[PoolConfig, Any]:
    cm, shape, engine = make_cost_model(spec)
    sched = make_scheduler_config(spec, cm, shape, engine)
    return PoolConfig(sched, cm, n, router=router, gpus_per_replica=spec.tp), shape


def trial(s: SearchSpec, prefill: int, decode: int, rate: float) -> dict[str, Any]:
    """One twin run: ``prefill`` = 0 means ``decode`` colocated replicas."""
    pool, shape = _pool(s.deployment, decode, s.router)
    cfg = SimConfig(pool, ttft_slo=s.ttft_slo, tpot_slo=s.tpot_slo, num_samples=1)
    if prefill:
        pspec = s.prefill_deployment or s.deployment
        ppool, _ = _pool(pspec, prefill, s.router)
        cfg = dataclasses.replace(cfg, prefill_pool=ppool, kv_transfer_bandwidth=s.kv_transfer_bandwidth,
                                  kv_transfer_latency=s.kv_transfer_latency,
                                  kv_bytes_per_token=kv_bytes_per_token(s.deployment, shape))  # fmt: skip
    vocab = shape.vocab_size if shape else 32000
    wl = W.synthetic(s.num_requests, rate, s.prompt_len, s.output_len, vocab_size=vocab, seed=s.seed)
    wl.clip(pool.scheduler.max_model_len - 1)
    res = simulate(wl, cfg)
    sm = res.summary
    good = sm.get("slo_attainment", 0.0) * sm.get("completed", 0)
    return {"rate": rate, "attainment": good / max(len(wl), 1), "gpus": sm.get("num_gpus", 0),
            "ttft_p90_ms": sm.get("ttft_ms", {}).get("p90"), "tpot_p90_ms": sm.get("tpot_ms", {}).get("p90")}  # fmt: skip


def max_rate(s: SearchSpec, prefill: int, decode: int, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Highest rate meeting the attainment target (0 when even a trickle misses it)."""
    trials = []

    def ok(rate: float) -> bool:
        t = trial(s, prefill, decode, rate)
        trials.append(t)
        return t["attainment"] >= s.attainment

    lo, hi = 0.0, 0.5 * (prefill + decode)
    while ok(hi):
        lo, hi = hi, hi * 2
        if hi > 1e6:
            break
    if lo == 0.0:
        # Even the first guess failed: look lower before giving up.
        probe = hi / 2
        while probe > 1e-3 and not ok(probe):
            hi, probe = probe, probe / 2
        if probe <= 1e-3:
            return {"prefill": prefill, "decode": decode, "max_rate": 0.0, "trials": trials}
        lo = probe
    while hi - lo > s.rate_tolerance * lo:
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    gpus = trials[-1]["gpus"]
    out = {"prefill": prefill, "decode": decode, "max_rate": lo, "gpus": gpus,
           "goodput_per_gpu": lo / gpus if gpus else 0.0, "trials": trials}  # fmt: skip
    if log is not None:
        kind = f"{prefill}P:{decode}D" if prefill else f"{decode} colocated"
        log(f"{kind:>16}: {lo:8.2f} req/s within SLO on {gpus} GPUs = {out['goodput_per_gpu']:.3f} req/s/GPU")
    return out


def candidates(s: SearchSpec) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    if s.colocated:
        n = 1
        while n <= s.max_replicas:
            out.append((0, n))
            n *= 2
    if s.disaggregated:
        for total in range(2, s.max_replicas + 1):
            for p in range(1, total):
                out.append((p, total - p))
    return out


def search(s: SearchSpec, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    results = [max_rate(s, p, d, log) for p, d in candidates(s)]
    best = max(results, key=lambda r: r.get("goodput_per_gpu", 0.0))
    return {
        "slo": {"ttft_s": s.ttft_slo, "tpot_s": s.tpot_slo, "attainment": s.attainment},
        "best": {k: v for k, v in best.items() if k != "trials"},
        "results": results,
    }
