"""``tokenmill sim validate``: the twin against the real engine on the same workload.

1. Profile the model's executor on a grid (or load a profile) for the
   profiled cost model.
2. Run a Poisson workload on the real ``Engine`` with the wall clock: each
   request is added when its arrival time comes, the loop steps while there
   is work and sleeps until the next arrival when there is none; TTFT and
   TPOT come from the times at which ``step()`` returns each request's tokens.
3. Run the same workload in the twin, with the engine's own scheduler
   configuration (same KV blocks) and the profiled cost model, in ``engine``
   mode (the engine plans up to ``max_decode_steps`` decodes blind to arrivals
   and hands tokens out when a plan returns).
4. Report mean and p90 TTFT and TPOT and output throughput from both, and
   the twin's relative error on each. A fixed reference step is timed before
   the profile, before the real run and after it; on a shared machine its
   time moves, so the report also gives the twin re-run with its costs scaled
   by how much faster or slower the machine was during the real run than
   during the profile ("drift-corrected"), next to the raw errors.

Timings on a shared CPU are noisy; torch runs with ``threads`` threads
(default 1, which keeps step times stable when other processes compete for
the cores) in both the profile and the real run.

With ``replicas > 1`` or ``pd=(P, D)`` the real run is a cluster: replicas
as Ray actors (``threads`` threads each) behind the front end and its core
router (``cluster/``), the workload sent through the front end in wall time
(``cluster/record.py``), times taken where a client would see them; the
twin runs the same pools and routers (the decode pool routes by least
outstanding tokens in both), with each prefill-to-decode transfer priced at
the mean time the real transfers took in the run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tokenmill.core.request import SamplingParams
from tokenmill.sim import workload as W
from tokenmill.sim.config import PoolConfig, SimConfig
from tokenmill.sim.cost_model import CostModel, StepFeatures
from tokenmill.sim.profiled import ProfiledCostModel
from tokenmill.sim.simulator import simulate


def run_engine(engine: Any, wl: W.Workload, clock: Callable[[], float] = time.perf_counter) -> dict[str, np.ndarray]:
    """Serve ``wl`` on a real engine in wall time; per-request arrival, first-token and finish times."""
    n = len(wl.requests)
    arrival = np.array([r.arrival for r in wl.requests])
    first = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    n_out = np.zeros(n, dtype=np.int64)
    start = clock()
    i = 0
    while i < n or engine.has_unfinished():
        now = clock() - start
        while i < n and arrival[i] <= now:
            spec = wl.requests[i]
            engine.add_request(str(i), wl.prompt_tokens(i, spec),
                               SamplingParams(max_tokens=spec.output_len, ignore_eos=True, temperature=0.0))  # fmt: skip
            i += 1
        if not engine.has_unfinished():
            if i < n:
                time.sleep(max(0.0, arrival[i] - (clock() - start)))
            continue
        outputs = engine.step()
        t = clock() - start
        for out in outputs:
            k = int(out.request_id)
            c = out.outputs[0]
            if c.token_ids and np.isnan(first[k]):
                first[k] = t
            n_out[k] = len(c.token_ids)
            if out.finished:
                finish[k] = t
    return {"arrival": arrival, "first": first, "finish": finish, "n_out": n_out}


def metrics_from_times(arrival: np.ndarray, first: np.ndarray, finish: np.ndarray, n_out: np.ndarray) -> dict[str, float]:
    ttft = first - arrival
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(n_out > 1, (finish - first) / np.maximum(n_out - 1, 1), np.nan)
    tpot = tpot[~np.isnan(tpot)]
    duration = float(np.nanmax(finish) - arrival.min())
    return {
        "ttft_mean_ms": float(np.nanmean(ttft)) * 1000,
        "ttft_p90_ms": float(np.nanpercentile(ttft, 90)) * 1000,
        "tpot_mean_ms": float(tpot.mean()) * 1000 if tpot.size else float("nan"),
        "tpot_p90_ms": float(np.percentile(tpot, 90)) * 1000 if tpot.size else float("nan"),
        "output_throughput": float(n_out.sum()) / duration,
        "request_throughput": len(arrival) / duration,
        "duration_s": duration,
    }


def compare(real: dict[str, float], twin: dict[str, float]) -> dict[str, float]:
    """Relative error of the twin on each metric, in percent."""
    return {k: 100.0 * (twin[k] - real[k]) / real[k] for k in real if real[k] and np.isfinite(real[k])}


def validate(
    model: str | None = None,
    profile: str | dict[str, Any] | None = None,
    num_requests: int = 60,
    rate: float = 2.0,
    prompt_len: str = "lognormal:96,0.5",
    output_len: str = "lognormal:48,0.5",
    kv_cache_memory: int = 256 << 20,
    block_size: int = 16,
    max_num_batched_tokens: int = 512,
    max_num_seqs: int = 32,
    max_decode_steps: int = 8,
    dtype: str = "float32",
    threads: int = 1,
    seed: int = 0,
    grid: str | dict[str, list[int]] = "quick",
    repeats: int = 3,
    log: Callable[[str], None] = print,
    replicas: int = 1,
    pd: tuple[int, int] | None = None,
    router: str = "round_robin",
) -> dict[str, Any]:
    """Run the real engine (or cluster) and the twin on the same workload; return both metric sets and the errors."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _validate(model, profile, num_requests, rate, prompt_len, output_len, kv_cache_memory, block_size,
                         max_num_batched_tokens, max_num_seqs, max_decode_steps, dtype, threads, seed, grid,
                         repeats, log, replicas, pd, router)  # fmt: skip
    finally:
        torch.set_num_threads(previous)


def _validate(model: str | None, profile: str | dict[str, Any] | None, num_requests: int, rate: float,
              prompt_len: str, output_len: str, kv_cache_memory: int, block_size: int, max_num_batched_tokens: int,
              max_num_seqs: int, max_decode_steps: int, dtype: str, threads: int, seed: int,
              grid: str | dict[str, list[int]], repeats: int, log: Callable[[str], None], replicas: int,
              pd: tuple[int, int] | None, router: str) -> dict[str, Any]:  # fmt: skip
    from tokenmill.engine import Engine, EngineConfig, resolve_model_path

    path = resolve_model_path(model)
    engine = Engine(EngineConfig(model=path, dtype=dtype, kv_cache_memory=kv_cache_memory, block_size=block_size,
                                 max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                 max_decode_steps=max_decode_steps))  # fmt: skip
    probes = [probe(engine.executor)]
    if profile is None:
        from tokenmill.sim.profiler import profile_model

        log(f"profiling {path} ({grid} grid)...")
        table = profile_model(path, grid=grid, dtype=dtype, block_size=block_size,
                              max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                              repeats=repeats, multistep=max_decode_steps)  # fmt: skip
    elif isinstance(profile, dict):
        table = profile
    else:
        import json
        from pathlib import Path

        table = json.loads(Path(profile).read_text())
    cm = ProfiledCostModel(table)
    probes.append(probe(engine.executor))
    wl = W.synthetic(num_requests, rate, prompt_len, output_len, vocab_size=engine.vocab_size, seed=seed)
    wl.clip(engine.max_model_len - 1)
    clustered = replicas > 1 or pd is not None
    what = f"cluster ({_deployment(replicas, pd, router)})" if clustered else "engine"
    log(f"real {what}: {num_requests} requests at {rate} req/s...")
    t0 = time.perf_counter()
    transfer: dict[str, float] = {}
    if clustered:
        times = run_cluster(engine.config, wl, replicas, pd, router, threads, transfer)
    else:
        times = run_engine(engine, wl)
    real_wall = time.perf_counter() - t0
    probes.append(probe(engine.executor))
    real = metrics_from_times(times["arrival"], times["first"], times["finish"], times["n_out"])
    sched_cfg = dataclasses.replace(engine.scheduler.config)
    block_bytes = engine.executor.kv_bytes_per_block

    def twin_config(cost: CostModel) -> SimConfig:
        return _twin_config(sched_cfg, cost, replicas, pd, router, block_bytes, transfer)

    res = simulate(wl, twin_config(cm))
    twin = _twin_metrics(res)
    # The machine's speed when the profile was taken vs during the real run, from the
    # reference step around each; the twin re-run with its costs scaled by that ratio.
    speed = ((probes[1] + probes[2]) / 2) / ((probes[0] + probes[1]) / 2)
    corrected = _twin_metrics(simulate(wl, twin_config(ScaledCostModel(cm, speed))))
    return {
        "model": str(path),
        "workload": wl.summary(),
        "engine": {"kv_cache_memory": kv_cache_memory, "num_blocks": sched_cfg.num_blocks, "block_size": block_size,
                   "max_num_batched_tokens": max_num_batched_tokens, "max_num_seqs": max_num_seqs,
                   "max_decode_steps": max_decode_steps, "dtype": dtype, "threads": threads},  # fmt: skip
        "deployment": _deployment(replicas, pd, router),
        "kv_transfer": transfer or None,
        "real": real,
        "twin": twin,
        "error_pct": compare(real, twin),
        "twin_drift_corrected": corrected,
        "error_pct_drift_corrected": compare(real, corrected),
        "real_wall_s": real_wall,
        "twin_wall_s": res.wall_time,
        "profile": cm.describe(),
        # The same fixed step timed before the profile, between it and the real run, and after:
        # how much the machine's speed moved while the two were measured.
        "probe_ms": {"before_profile": probes[0] * 1000, "before_real_run": probes[1] * 1000,
                     "after_real_run": probes[2] * 1000},
        "machine_drift_pct": 100.0 * ((probes[1] + probes[2]) / 2 - (probes[0] + probes[1]) / 2)
        / ((probes[0] + probes[1]) / 2),
    }


def _deployment(replicas: int, pd: tuple[int, int] | None, router: str) -> str:
    if pd is not None:
        return f"{pd[0]} prefill ({router}) : {pd[1]} decode (least_outstanding_tokens)"
    return f"{replicas} replica{'s' if replicas > 1 else ''} ({router})"


def run_cluster(config: Any, wl: W.Workload, replicas: int, pd: tuple[int, int] | None, router: str, threads: int,
                transfer: dict[str, float]) -> dict[str, np.ndarray]:  # fmt: skip
    """Serve ``wl`` on a local Ray cluster of replicas in wall time (see the module docstring);
    per-request times as ``run_engine`` gives them. ``transfer`` gets the KV transfers' totals."""
    import asyncio

    from tokenmill.cluster.launch import ClusterSpec, start_cluster
    from tokenmill.cluster.record import run_workload

    spec = ClusterSpec(replicas=replicas, pd=pd, threads_per_replica=threads, router=router)
    cluster = start_cluster(spec, config, "validate")
    engine = cluster.engine
    requests = [(str(i), r.arrival, wl.prompt_tokens(i, r),
                 SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0.0))
                for i, r in enumerate(wl.requests)]  # fmt: skip

    async def main() -> dict[str, dict[str, float]]:
        engine.start()
        try:
            return await run_workload(engine, requests)
        finally:
            await engine.stop()

    try:
        got = asyncio.run(main())
    finally:
        cluster.shutdown()
    m = engine.metrics
    lab = {"model_name": "validate"}
    n = m.kv_transfers.labels(**lab)._value.get()
    if n:
        transfer.update(transfers=n, blocks=m.kv_transfer_blocks.labels(**lab)._value.get(),
                        bytes=m.kv_transfer_bytes.labels(**lab)._value.get(),
                        mean_s=m.kv_transfer_seconds.labels(**lab)._sum.get() / n)  # fmt: skip
    t0 = min(t["arrival"] for t in got.values())
    keys = [str(i) for i in range(len(requests))]
    return {
        "arrival": np.array([got[k]["arrival"] - t0 for k in keys]),
        "first": np.array([got[k]["first"] - t0 for k in keys]),
        "finish": np.array([got[k]["finish"] - t0 for k in keys]),
        "n_out": np.array([got[k]["n_out"] for k in keys], dtype=np.int64),
    }


def _twin_config(sched: Any, cost: CostModel, replicas: int, pd: tuple[int, int] | None, router: str,
                 block_bytes: int, transfer: dict[str, float]) -> SimConfig:  # fmt: skip
    if pd is None:
        return SimConfig(PoolConfig(sched, cost, replicas, router), mode="engine")
    p, d = pd
    # Each transfer costs what the real ones took on average (export, object store, import).
    return SimConfig(PoolConfig(sched, cost, d, "least_outstanding_tokens"),
                     prefill_pool=PoolConfig(dataclasses.replace(sched), cost, p, router), mode="engine",
                     kv_transfer_latency=transfer.get("mean_s", 0.0), kv_transfer_bandwidth=float("inf"),
                     kv_bytes_per_token=block_bytes / sched.block_size)  # fmt: skip


def _twin_metrics(res: Any) -> dict[str, float]:
    rec = res.records
    order = np.argsort(np.array(rec.index))
    return metrics_from_times(np.array(rec.arrival)[order], np.array(rec.first_token)[order],
                              np.array(rec.finish)[order], np.array(rec.output_len)[order])  # fmt: skip


class ScaledCostModel(CostModel):
    """Another cost model's times multiplied by a constant (a machine running slower or faster)."""

    name = "scaled"

    def __init__(self, inner: CostModel, factor: float) -> None:
        self.inner = inner
        self.factor = factor

    def step_time(self, f: StepFeatures) -> float:
        return self.factor * self.inner.step_time(f)

    def decode_time(self, num_seqs: int, context: int, num_steps: int) -> float:
        return self.factor * self.inner.decode_time(num_seqs, context, num_steps)

    def plan_time(self, plan: Any) -> float:
        return self.factor * self.inner.plan_time(plan)

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "scaled_by": self.factor}


def probe(executor: Any, repeats: int = 15) -> float:
    """Median seconds of one fixed mixed step (a 32-token prefill and 8 decodes at context 128)."""
    from tokenmill.sim.profiler import _Blocks, build_plan, time_executor

    plan = build_plan(32, 8, 128, _Blocks(executor.num_blocks, executor.block_size), executor.model_config.vocab_size)
    return time_executor(executor, plan, repeats, warmup=2, stat="median")
