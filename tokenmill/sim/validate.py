"""``tokenmill sim validate``: the twin against the real engine on the same workload.

1. Profile the model's executor on a grid (or load a profile) for the
   profiled cost model: the median of repeats with outliers dropped, and the
   spread of one reference step's time (``sim.jitter``).
2. Run the workload on the real ``Engine`` with the wall clock, ``real_runs``
   times, each on a fresh engine (an empty prefix cache, as the twin starts):
   each request is added when its arrival time comes, the loop steps while
   there is work and sleeps until the next arrival when there is none; TTFT
   and TPOT come from the times at which ``step()`` returns each request's
   tokens. The engine's own run-to-run spread on each metric is the largest
   relative distance of one run from the runs' mean: a twin error inside it
   is as close as one more real run would be.
3. Run the same workload in the twin, with the engine's own scheduler
   configuration (same KV blocks) and the profiled cost model, in ``engine``
   mode (the engine plans up to ``max_decode_steps`` decodes blind to arrivals
   and hands tokens out when a plan returns). With the profile's jitter, each
   plan's time is drawn from the measured distribution and the twin runs
   ``twin_runs`` seeds; its metrics are their mean, so its p90 and p99 carry
   the stalls that the median step time leaves out.
4. Report mean, p90 and p99 TTFT and TPOT and output throughput from both,
   the twin's relative error on each against the mean of the real runs, the
   engine's spread, and whether each error is within ``max(5%, spread)``.
   Each real plan is priced by the profile and set against its measured
   executor time (``step_time_check``): that ratio says how much of an error
   comes from the step times rather than from queueing. The report also gives
   the twin re-run with its costs scaled by the runs' total measured/priced
   ratio ("drift-corrected": the machine's speed during the runs, from their
   step times, never their latencies), and the reference step (the one the
   jitter is measured on) timed around every run.

Workloads: synthetic (length distributions, Poisson or bursty gamma
arrivals, shared-prefix groups) or a trace CSV with timestamp, prompt tokens
and output tokens, as the Azure LLM inference traces have (``--trace``),
with its lengths scaled to the model (``length_scale``).

Timings on a shared CPU are noisy; torch runs with ``threads`` threads
(default 1), optionally pinned to ``cpus``, in the profile and the real runs.

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
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tokenmill.core.plan import ScheduledSeq, StepPlan
from tokenmill.core.request import SamplingParams
from tokenmill.sim import workload as W
from tokenmill.sim.build import WorkloadSpec
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
    base = engine.clock()  # the engine's clock at the same instant: arrivals are stamped on it
    i = 0
    while i < n or engine.has_unfinished():
        now = clock() - start
        while i < n and arrival[i] <= now:
            spec = wl.requests[i]
            engine.add_request(str(i), wl.prompt_tokens(i, spec),
                               SamplingParams(max_tokens=spec.output_len, ignore_eos=True, temperature=0.0),
                               arrival_time=base + float(arrival[i]))  # fmt: skip
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
        "ttft_p99_ms": float(np.nanpercentile(ttft, 99)) * 1000,
        "tpot_p99_ms": float(np.percentile(tpot, 99)) * 1000 if tpot.size else float("nan"),
        "output_throughput": float(n_out.sum()) / duration,
        "request_throughput": len(arrival) / duration,
        "duration_s": duration,
    }


def compare(real: dict[str, float], twin: dict[str, float]) -> dict[str, float]:
    """Relative error of the twin on each metric, in percent."""
    return {k: 100.0 * (twin[k] - real[k]) / real[k] for k in real if real[k] and np.isfinite(real[k])}


# Metrics the acceptance target covers; the rest are reported beside them.
TARGET_METRICS = ("ttft_mean_ms", "ttft_p90_ms", "tpot_mean_ms", "tpot_p90_ms")
TARGET_PCT = 5.0


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
    *,
    real_runs: int = 3,
    twin_runs: int = 5,
    jitter: bool = True,
    workload: WorkloadSpec | None = None,
    length_scale: float = 1.0,
    cpus: set[int] | None = None,
    trace_dir: str | Path | None = None,
    replicas: int = 1,
    pd: tuple[int, int] | None = None,
    router: str = "round_robin",
) -> dict[str, Any]:
    """Run the real engine (or cluster) ``real_runs`` times and the twin on the same workload; return both, the errors and the spread.

    ``workload`` (a ``sim.build.WorkloadSpec``) replaces the synthetic Poisson
    workload that ``num_requests``, ``rate``, ``prompt_len``, ``output_len``
    and ``seed`` describe; ``length_scale`` multiplies its prompt and output
    lengths (a trace's lengths, to fit a small model).
    """
    from tokenmill.sim.pinning import pinned

    if real_runs < 1 or twin_runs < 1:
        raise ValueError("real_runs and twin_runs must be >= 1")
    if workload is None:
        workload = WorkloadSpec(num_requests=num_requests, rate=rate, prompt_len=prompt_len, output_len=output_len,
                                seed=seed)  # fmt: skip
    with pinned(threads, cpus) as pin:
        report = _validate(model, profile, kv_cache_memory, block_size, max_num_batched_tokens, max_num_seqs,
                           max_decode_steps, dtype, grid, repeats, log, real_runs, twin_runs, jitter, workload,
                           length_scale, trace_dir, threads, replicas, pd, router)  # fmt: skip
    report["engine"].update(threads=pin["threads"], cpus=pin["cpus"])
    return report


def _validate(model: str | None, profile: str | dict[str, Any] | None, kv_cache_memory: int, block_size: int,
              max_num_batched_tokens: int, max_num_seqs: int, max_decode_steps: int, dtype: str,
              grid: str | dict[str, list[int]], repeats: int, log: Callable[[str], None], real_runs: int,
              twin_runs: int, jitter: bool, ws: WorkloadSpec, length_scale: float,
              trace_dir: str | Path | None, threads: int = 1, replicas: int = 1, pd: tuple[int, int] | None = None,
              router: str = "round_robin") -> dict[str, Any]:  # fmt: skip
    from tokenmill.engine import Engine, EngineConfig, resolve_model_path

    path = resolve_model_path(model)

    def make_engine(timeline_requests: int = 0) -> Any:
        return Engine(EngineConfig(model=path, dtype=dtype, kv_cache_memory=kv_cache_memory, block_size=block_size,
                                   max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                   max_decode_steps=max_decode_steps, timeline_requests=timeline_requests,
                                   record_steps=True))  # fmt: skip

    engine = make_engine()
    table = load_or_profile(path, profile, grid, dtype, block_size, max_num_batched_tokens, max_num_seqs,
                            max_decode_steps, repeats, log)  # fmt: skip
    cm = ProfiledCostModel(table)
    wl = validation_workload(ws, engine.vocab_size, engine.max_model_len, length_scale)
    sched_cfg = dataclasses.replace(engine.scheduler.config)
    block_bytes = engine.executor.kv_bytes_per_block
    del engine
    clustered = replicas > 1 or pd is not None
    transfer: dict[str, float] = {}
    what = f"cluster ({_deployment(replicas, pd, router)})" if clustered else "engine"
    log(f"real {what}: {len(wl)} requests ({wl.description.get('kind')}), {real_runs} runs...")
    serve = None
    if clustered:
        def serve(engine: Any, wl: W.Workload) -> dict[str, np.ndarray]:
            return run_cluster(engine.config, wl, replicas, pd, router, threads, transfer)

    runs = repeat_engine(make_engine, wl, real_runs, log, keep_timelines=trace_dir is not None and not clustered,
                         serve=serve)  # fmt: skip

    def twin_config(cost: CostModel, timeline_requests: int) -> SimConfig:
        cfg = _twin_config(dataclasses.replace(sched_cfg), cost, replicas, pd, router, block_bytes, transfer)
        return dataclasses.replace(cfg, timeline_requests=timeline_requests)

    real = mean_metrics([r["metrics"] for r in runs])
    spread = run_spread([r["metrics"] for r in runs])
    ratios = (table.get("jitter") or {}).get("ratio_quantiles") if jitter else None
    twin_sets, twin_timeline, twin_wall = run_twin(wl, twin_config, cm, ratios, twin_runs,
                                                   keep_timeline=trace_dir is not None and not clustered)  # fmt: skip
    twin = mean_metrics(twin_sets)
    # How much slower (> 1) the machine ran the reference step during the real runs than when the
    # profile was taken (shown), and how much slower it ran the real runs' own plans than the
    # profile prices them (used): the twin re-run with its costs scaled by the latter. It takes the
    # real runs' step times, never their latencies: queueing still comes from the twin alone.
    probes = [p for r in runs for p in (r["probe_before_s"], r["probe_after_s"])]
    reference = (table.get("jitter") or {}).get("median_s") or float(np.median(probes))
    speed = float(np.mean(probes)) / reference
    checks = [step_time_check(r["steps"], cm) for r in runs]
    priced = sum(c.get("priced_s", 0.0) for c in checks)
    # A cluster's plans run in its replicas (no step log here): the reference step's drift stands in.
    factor = sum(c.get("measured_s", 0.0) for c in checks) / priced if priced > 0 else speed
    corrected = mean_metrics(run_twin(wl, twin_config, ScaledCostModel(cm, factor), ratios, twin_runs)[0])
    error = compare(real, twin)
    report: dict[str, Any] = {
        "model": str(path),
        "workload": wl.summary(),
        "engine": {"kv_cache_memory": kv_cache_memory, "num_blocks": sched_cfg.num_blocks, "block_size": block_size,
                   "max_num_batched_tokens": max_num_batched_tokens, "max_num_seqs": max_num_seqs,
                   "max_decode_steps": max_decode_steps, "dtype": dtype},  # fmt: skip
        "deployment": _deployment(replicas, pd, router),
        "kv_transfer": transfer or None,
        "real": real,
        "real_runs": [r["metrics"] for r in runs],
        "real_spread_pct": spread,
        # Per real run: its plans' measured executor time against the profile's price of them.
        "step_time_check": checks,
        "twin": twin,
        "twin_runs": len(twin_sets),
        "twin_spread_pct": run_spread(twin_sets),
        "twin_jitter": ratios is not None,
        "error_pct": error,
        "within_target": within_target(error, spread),
        "twin_drift_corrected": corrected,
        "drift_factor": factor,
        "error_pct_drift_corrected": compare(real, corrected),
        "real_wall_s": sum(r["wall_s"] for r in runs),
        "twin_wall_s": twin_wall,
        "profile": cm.describe(),
        "probe_ms": {"profile": reference * 1000, "real_runs": [[r["probe_before_s"] * 1000, r["probe_after_s"] * 1000]
                                                                  for r in runs]},  # fmt: skip
        "machine_drift_pct": 100.0 * (speed - 1.0),
    }
    if trace_dir is not None and not clustered:
        report["timelines"] = write_timelines(Path(trace_dir), runs, twin_timeline)
    return report


def step_time_check(step_log: list[Any], cm: CostModel) -> dict[str, float]:
    """The real runs' measured executor time per plan against the cost model's price of the same plan.

    Each ``StepRecord`` carries its plan's summary and measured duration; the
    plan is rebuilt from the summary (the features a cost model reads) and
    priced without the engine's overhead outside the executor, which the
    measured duration does not include either. Ratios above 1: the engine's
    steps ran slower than the profile says.
    """
    over = getattr(cm, "overhead", 0.0)
    over_tok = getattr(cm, "overhead_per_token", 0.0)
    ratios, measured, priced = [], 0.0, 0.0
    for rec in step_log:
        k, seqs, _ = rec.summary
        plan = StepPlan(0, 0.0, [ScheduledSeq(rid, start, n, [], 0, [], samples) for rid, start, n, samples, *_ in seqs],
                        num_steps=k)  # fmt: skip
        price = cm.plan_time(plan) - over - over_tok * k * sum(1 for s in seqs if s[3])
        if price > 0:
            ratios.append(rec.duration / price)
            measured += rec.duration
            priced += price
    if not ratios:
        return {}
    p10, p50, p90 = np.percentile(ratios, [10, 50, 90])
    return {"plans": len(ratios), "measured_s": measured, "priced_s": priced, "measured_over_priced": measured / priced,
            "ratio_p10": float(p10), "ratio_p50": float(p50), "ratio_p90": float(p90)}  # fmt: skip


def load_or_profile(path: str, profile: str | dict[str, Any] | None, grid: str | dict[str, list[int]], dtype: str,
                    block_size: int, max_num_batched_tokens: int, max_num_seqs: int, max_decode_steps: int,
                    repeats: int, log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """The profile table: ``profile`` itself, read from its path, or measured now (robust medians and jitter)."""
    if isinstance(profile, dict):
        return profile
    if profile is not None:
        return json.loads(Path(profile).read_text())
    from tokenmill.sim.profiler import profile_model

    log(f"profiling {path} ({grid} grid)...")
    return profile_model(path, grid=grid, dtype=dtype, block_size=block_size,
                         max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                         repeats=repeats, multistep=max_decode_steps, stat="robust")  # fmt: skip


def validation_workload(ws: WorkloadSpec, vocab_size: int, max_model_len: int, length_scale: float = 1.0) -> W.Workload:
    """The workload ``ws`` describes, lengths times ``length_scale``, clipped to the model's context."""
    from tokenmill.sim.build import make_workload

    if length_scale <= 0:
        raise ValueError(f"length_scale must be > 0, got {length_scale}")
    wl = make_workload(ws, vocab_size, None)
    if length_scale != 1.0:
        for r in wl.requests:
            r.prompt_len = max(1, round(r.prompt_len * length_scale))
            r.output_len = max(1, round(r.output_len * length_scale))
            if r.prompt_tokens is not None:
                r.prompt_tokens = r.prompt_tokens[: r.prompt_len]
        wl.description["length_scale"] = length_scale
    wl.clip(max_model_len - 1)
    return wl


def repeat_engine(make_engine: Callable[..., Any], wl: W.Workload, runs: int, log: Callable[[str], None],
                  keep_timelines: bool = False,
                  serve: Callable[[Any, W.Workload], dict[str, np.ndarray]] | None = None) -> list[dict[str, Any]]:
    """``runs`` real runs of ``wl``, each on a fresh engine; metrics, wall time and the reference step around each.

    ``serve(engine, wl)`` runs the workload instead of this process's engine (a
    cluster built from the engine's config); the engine then only times the
    reference step.
    """
    out = []
    for i in range(runs):
        engine = make_engine(len(wl) if keep_timelines else 0)
        before = probe(engine.executor)
        t0 = time.perf_counter()
        times = serve(engine, wl) if serve is not None else run_engine(engine, wl)
        wall = time.perf_counter() - t0
        after = probe(engine.executor)
        m = metrics_from_times(times["arrival"], times["first"], times["finish"], times["n_out"])
        log(f"  run {i + 1}: TTFT mean {m['ttft_mean_ms']:.1f} ms p90 {m['ttft_p90_ms']:.1f} ms, "
            f"TPOT mean {m['tpot_mean_ms']:.2f} ms p90 {m['tpot_p90_ms']:.2f} ms")  # fmt: skip
        out.append({"metrics": m, "wall_s": wall, "probe_before_s": before, "probe_after_s": after,
                    "timeline": engine.scheduler.timeline, "steps": engine.step_log})  # fmt: skip
        del engine
    return out


def run_twin(wl: W.Workload, config: Any, cm: CostModel, ratios: list[float] | None, runs: int,
             keep_timeline: bool = False) -> tuple[list[dict[str, float]], Any, float]:  # fmt: skip
    """Twin metrics per run (one run without jitter; ``runs`` seeds with it), the first run's timeline, wall seconds.

    ``config`` is the engine's ``SchedulerConfig`` (one replica), or a function
    ``(cost model, timeline requests) -> SimConfig`` for other deployments.
    """
    from tokenmill.sim.jitter import JitterCostModel

    sets, timeline, wall = [], None, 0.0
    for seed in range(runs if ratios is not None else 1):
        model = JitterCostModel(cm, ratios, seed) if ratios is not None else cm
        timeline_requests = len(wl) if keep_timeline and seed == 0 else 0
        if callable(config):
            cfg = config(model, timeline_requests)
        else:
            cfg = SimConfig(PoolConfig(dataclasses.replace(config), model), mode="engine",
                            timeline_requests=timeline_requests)  # fmt: skip
        res = simulate(wl, cfg)
        wall += res.wall_time
        sets.append(_twin_metrics(res))
        if res.timelines:
            timeline = res.timelines[0]
    return sets, timeline, wall


def mean_metrics(sets: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([m[k] for m in sets])) for k in sets[0]}


def run_spread(sets: list[dict[str, float]]) -> dict[str, float]:
    """Per metric, the largest distance of one run from the runs' mean, in percent of the mean (0 for one run)."""
    mean = mean_metrics(sets)
    return {k: 100.0 * max(abs(m[k] - mean[k]) for m in sets) / abs(mean[k]) for k in mean
            if mean[k] and np.isfinite(mean[k])}  # fmt: skip


def within_target(error: dict[str, float], spread: dict[str, float]) -> dict[str, bool]:
    """Per target metric: is the twin's error within ``max(5%, the engine's own spread)``?"""
    return {k: abs(error[k]) <= max(TARGET_PCT, spread.get(k, 0.0)) for k in TARGET_METRICS if k in error}


def write_timelines(directory: Path, runs: list[dict[str, Any]], twin_timeline: Any) -> dict[str, Any]:
    """The engine's timelines (one per run), the twin's, and ``sim compare``'s plot of the first run against it."""
    from tokenmill.sim.compare import divergence, plot_compare
    from tokenmill.sim.trace_file import read_trace, write_trace

    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for i, r in enumerate(runs):
        f = directory / f"engine-run{i + 1}.json"
        write_trace(f, [r["timeline"]], {"side": "engine", "run": i + 1})
        files.append(str(f))
    twin_file = directory / "twin.json"
    write_trace(twin_file, [twin_timeline], {"side": "twin"}, origin=0.0)
    engine_tl, twin_tl = read_trace(files[0]), read_trace(twin_file)
    rep = divergence(engine_tl, twin_tl)
    plot_compare(engine_tl, twin_tl, directory / "compare.png", rep, title="engine run 1 vs twin")
    return {"engine": files, "twin": str(twin_file), "plot": str(directory / "compare.png"), "divergence": rep}

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
