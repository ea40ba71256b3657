"""``tokenmill sim search``: the deployment that serves the most requests per second per GPU within SLOs.

For each candidate (N colocated replicas, or P prefill + D decode replicas
with prefill/decode disaggregation) the search finds, by bracketing and
bisection on the Poisson arrival rate, the highest rate at which at least
``attainment`` of the requests meet both the TTFT and the TPOT SLO. Goodput
per GPU is that rate divided by the candidate's GPUs (DistServe's measure).

Every trial judges the candidate at steady state, not on a burst: a burst of
requests above capacity drains before its queue grows long, so most of it
can meet a TTFT SLO that the same rate misses for good once it is sustained.
So a trial

- runs at least ``num_requests`` requests and at least ``duration`` seconds
  of arrivals (the rate is sustained for that long);
- counts only requests that arrive after a warm-up (the first ``warmup`` of
  the arrival span), when the queues have filled to their steady level;
- requires the target in the final ``tail`` of the arrival span on its own
  as well: above capacity the queue grows and the latest requests fare
  worst, so a growing queue fails there first;
- stops as soon as more requests have missed than the target allows.

The best rate of each candidate is then confirmed on a run ``confirm`` times
longer (another seed), and lowered in steps of ``rate_tolerance`` until the
confirmation holds: a queue that grows too slowly to show in a trial shows
over the longer run.
"""

from __future__ import annotations

import dataclasses
import math
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
from tokenmill.sim.simulator import Simulator


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
    num_requests: int = 1000  # requests per trial, at least
    duration: float = 60.0  # seconds of arrivals per trial, at least
    warmup: float = 0.2  # fraction of the arrival span not counted
    tail: float = 0.25  # final fraction of the arrival span that must meet the target on its own
    confirm: float = 3.0  # the best rate is confirmed on a run this many times longer
    prompt_len: str = "azure"
    output_len: str = "azure"
    router: str = "least_outstanding_tokens"
    kv_transfer_bandwidth: float = 50e9
    kv_transfer_latency: float = 1e-3
    rate_tolerance: float = 0.05  # stop bisecting when the bracket is this tight (relative); confirmation step
    seed: int = 0


def _pool(spec: DeploymentSpec, n: int, router: str) -> tuple[PoolConfig, Any]:
    cm, shape, engine = make_cost_model(spec)
    sched = make_scheduler_config(spec, cm, shape, engine)
    return PoolConfig(sched, cm, n, router=router, gpus_per_replica=spec.tp), shape


class _Missed(Exception):
    """More requests missed their SLO than the target allows: the trial has failed."""


class _Judge:
    """Counts SLO misses among the measured requests of a trial as they finish; stops the run once it fails."""

    def __init__(self, wl: W.Workload, s: SearchSpec) -> None:
        arrivals = [r.arrival for r in wl.requests]
        t0, t1 = arrivals[0], arrivals[-1]
        self.warm_end = t0 + s.warmup * (t1 - t0)
        self.tail_start = t0 + (1.0 - s.tail) * (t1 - t0)
        self.measured = sum(1 for t in arrivals if t >= self.warm_end)
        self.tail = sum(1 for t in arrivals if t >= self.tail_start)
        self.allowed = math.floor((1.0 - s.attainment) * self.measured + 1e-9)
        self.tail_allowed = math.floor((1.0 - s.attainment) * self.tail + 1e-9)
        self.ttft_slo, self.tpot_slo = s.ttft_slo, s.tpot_slo
        self.misses = self.tail_misses = self.rejected = 0
        self.sim: Simulator | None = None

    def on_finished(self, done: int, rejected: int) -> None:
        assert self.sim is not None
        rec = self.sim.records
        arrival, first, out = rec.arrival[-1], rec.first_token[-1], rec.output_len[-1]
        met = first - arrival <= self.ttft_slo and (out < 2 or (rec.finish[-1] - first) / (out - 1) <= self.tpot_slo)
        if rejected > self.rejected:  # refused requests count as misses
            self.misses += rejected - self.rejected
            self.rejected = rejected
        if not met and arrival >= self.warm_end:
            self.misses += 1
            self.tail_misses += arrival >= self.tail_start
        if self.misses > self.allowed or self.tail_misses > self.tail_allowed:
            raise _Missed

    def attainment(self) -> tuple[float, float]:
        """(measured, tail) attainment; after an early stop, upper bounds."""
        return 1.0 - self.misses / max(self.measured, 1), 1.0 - self.tail_misses / max(self.tail, 1)


def trial(s: SearchSpec, prefill: int, decode: int, rate: float, length: float = 1.0, seed: int | None = None
          ) -> dict[str, Any]:  # fmt: skip
    """One twin run at ``rate`` (``prefill`` = 0: ``decode`` colocated replicas), judged at steady state.

    The run has ``length`` times the spec's requests and duration. ``ok`` says
    whether both the measured and the tail attainment reached the target.
    """
    pool, shape = _pool(s.deployment, decode, s.router)
    cfg = SimConfig(pool, ttft_slo=s.ttft_slo, tpot_slo=s.tpot_slo, num_samples=1)
    gpus = decode * pool.gpus_per_replica
    if prefill:
        pspec = s.prefill_deployment or s.deployment
        ppool, _ = _pool(pspec, prefill, s.router)
        gpus += prefill * ppool.gpus_per_replica
        cfg = dataclasses.replace(cfg, prefill_pool=ppool, kv_transfer_bandwidth=s.kv_transfer_bandwidth,
                                  kv_transfer_latency=s.kv_transfer_latency,
                                  kv_bytes_per_token=kv_bytes_per_token(s.deployment, shape))  # fmt: skip
    vocab = shape.vocab_size if shape else 32000
    n = math.ceil(length * max(s.num_requests, rate * s.duration))
    wl = W.synthetic(n, rate, s.prompt_len, s.output_len, vocab_size=vocab, seed=s.seed if seed is None else seed)
    wl.clip(pool.scheduler.max_model_len - 1)
    judge = _Judge(wl, s)
    sim = Simulator(wl, cfg, judge.on_finished)
    judge.sim = sim
    out: dict[str, Any] = {"rate": rate, "requests": n, "arrival_s": wl.duration, "gpus": gpus}
    try:
        sm = sim.run().summary
    except _Missed:
        stopped = True
    else:
        stopped = False
        out["ttft_p90_ms"] = sm.get("ttft_ms", {}).get("p90")
        out["tpot_p90_ms"] = sm.get("tpot_ms", {}).get("p90")
    att, tail = judge.attainment()
    out.update(attainment=att, tail_attainment=tail, stopped_early=stopped,
               ok=not stopped and att >= s.attainment and tail >= s.attainment)  # fmt: skip
    return out


def max_rate(s: SearchSpec, prefill: int, decode: int, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Highest rate meeting the attainment target at steady state (0 when even a trickle misses it)."""
    trials: list[dict[str, Any]] = []
    confirmations: dict[float, dict[str, Any]] = {}

    def ok(rate: float) -> bool:
        t = trial(s, prefill, decode, rate)
        trials.append(t)
        return bool(t["ok"])

    def confirmed(rate: float) -> bool:
        # Fresh requests (another seed) over a longer run.
        t = trial(s, prefill, decode, rate, s.confirm, s.seed + 1)
        trials.append({**t, "confirmation": True})
        confirmations[rate] = t
        return bool(t["ok"])

    kind = f"{prefill}P:{decode}D" if prefill else f"{decode} colocated"
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
            if log is not None:
                log(f"{kind:>16}: no rate meets the SLOs")
            return {"prefill": prefill, "decode": decode, "max_rate": 0.0, "trials": trials}
        lo = probe
    lo = _bisect(lo, hi, s.rate_tolerance, ok)
    # Confirm on the longer run. If it fails, step down in growing steps until a rate
    # holds, then bisect again at the longer length.
    rate, step = lo, s.rate_tolerance
    while rate > 1e-3 and not confirmed(rate):
        hi, rate, step = rate, rate * max(0.0, 1.0 - step), step * 2
    if rate <= 1e-3:
        rate = 0.0
    elif rate < lo:
        rate = _bisect(rate, hi, s.rate_tolerance, confirmed)
    gpus = trials[-1]["gpus"]
    confirmed = confirmations[rate] if rate else trials[-1]
    out = {"prefill": prefill, "decode": decode, "max_rate": rate, "gpus": gpus,
           "goodput_per_gpu": rate / gpus if gpus else 0.0,
           "confirmed": {k: confirmed[k] for k in ("requests", "arrival_s", "attainment", "tail_attainment")},
           "trials": trials}  # fmt: skip
    if log is not None:
        log(f"{kind:>16}: {rate:8.2f} req/s within SLO on {gpus} GPUs = {out['goodput_per_gpu']:.3f} req/s/GPU "
            f"(confirmed over {confirmed['requests']} requests: {confirmed['attainment']:.1%} met)")  # fmt: skip
    return out


def _bisect(lo: float, hi: float, tolerance: float, ok: Callable[[float], bool]) -> float:
    """The highest rate found to pass, given that ``lo`` passes and ``hi`` fails, within ``tolerance``."""
    while hi - lo > tolerance * lo:
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


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
        "steady_state": {"num_requests": s.num_requests, "duration_s": s.duration, "warmup": s.warmup,
                         "tail": s.tail, "confirm": s.confirm},  # fmt: skip
        "best": {k: v for k, v in best.items() if k != "trials"},
        "results": results,
    }
