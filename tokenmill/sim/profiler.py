"""``tokenmill profile``: measure the real executor's step time on a grid, for the profiled cost model.

The profiler builds ``StepPlan``s itself (requests with random prompt tokens,
block tables from a simple allocator over the executor's KV cache) and times
``ModelExecutor.execute`` at every point of a grid of

- prefill tokens in the step (one prompt chunk),
- decode sequences in the step (one token each),
- mean context per decode sequence (or, without decodes, the prior context
  of the prefill chunk),

taking the median of a few repeats after a warm-up, outliers dropped
(``robust_median``), and the distribution of one fixed step's time over
many repeats (``sim.jitter``: the stalls the median leaves out, so the twin
can draw them back in). It then runs the real
``Engine`` on a small batch to measure what a step costs outside the executor
(scheduling, updates, detokenisation) as ``per_step + per_seq * sequences``,
and times this CPU's matmul FLOP/s and memory bandwidth for the roofline
model's ``cpu`` hardware. Everything goes into one JSON table
(``tokenmill-profile/1``) that ``ProfiledCostModel`` reads.

KV blocks are distinct per sequence while the cache holds them and are
reused round-robin beyond that; timings do not depend on what the KV holds.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenmill.core.plan import StepPlan, standalone_seq
from tokenmill.core.request import Request, SamplingParams
from tokenmill.sim.profiled import FORMAT

GRIDS: dict[str, dict[str, list[int]]] = {
    "quick": {"prefill_tokens": [0, 32, 128, 512, 2048], "decode_seqs": [0, 1, 4, 16, 64],
              "context_tokens": [16, 256, 1024, 4096]},
    "full": {"prefill_tokens": [0, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192],
             "decode_seqs": [0, 1, 2, 4, 8, 16, 32, 64, 128, 256],
             "context_tokens": [16, 128, 512, 1024, 2048, 4096, 8192]},
}  # fmt: skip


def fit_axes(
    axes: dict[str, list[int]],
    *,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    max_model_len: int,
    kv_tokens: int,
    num_blocks: int,
) -> tuple[dict[str, list[int]], list[str]]:
    """The grid cut to what the engine can run, and a note for each cut the model or its KV forced.

    The engine's own limits (``max_num_batched_tokens``, ``max_num_seqs``)
    bound the prefill and decode axes and are measured at, as before: past
    the last point the table extrapolates. The model's context and the KV
    cache bound them too: a sequence holds at most ``max_model_len - 1``
    tokens of context before the one it computes (positions past the context
    have no rotary embedding), and no more than the cache holds; a decode
    needs a block of its own. Points where many decodes of a long context
    together exceed the cache are still measured, reusing blocks (timings do
    not depend on what the KV holds).
    """
    notes: list[str] = []
    seq_cap = min(max_model_len, kv_tokens) - 1

    def why(cap: int) -> str:
        if max_model_len - 1 == cap:
            return f"the model's context is {max_model_len} tokens"
        return f"the KV cache holds {kv_tokens} tokens"

    out: dict[str, list[int]] = {}
    asked = list(axes["prefill_tokens"])
    cap = min(max_num_batched_tokens, seq_cap)
    out["prefill_tokens"] = sorted({p for p in asked if p < cap} | {cap})
    if seq_cap < max_num_batched_tokens:
        notes.append(f"prefill_tokens clamped to {cap} ({why(seq_cap)}; max_num_batched_tokens is "
                     f"{max_num_batched_tokens})")  # fmt: skip
    asked = list(axes["decode_seqs"])
    cap = min(max_num_seqs, num_blocks)
    out["decode_seqs"] = sorted({d for d in asked if d < cap} | {cap})
    if cap < max_num_seqs:
        notes.append(f"decode_seqs clamped to {cap} (the KV cache has {num_blocks} blocks, one per sequence at "
                     f"least; asked up to {max_num_seqs})")  # fmt: skip
    asked = list(axes["context_tokens"])
    out["context_tokens"] = sorted({min(c, seq_cap) for c in asked})
    if max(asked) > seq_cap:
        notes.append(f"context_tokens clamped to {seq_cap} ({why(seq_cap)}; asked up to {max(asked)})")
    return out, notes


class _Blocks:
    """Hands out block ids round-robin over the cache; distinct while they last."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.next = 0

    def table(self, num_tokens: int) -> list[int]:
        n = -(-num_tokens // self.block_size)
        ids = [(self.next + i) % self.num_blocks for i in range(n)]
        self.next = (self.next + n) % self.num_blocks
        return ids


def build_plan(prefill: int, decode: int, context: int, blocks: _Blocks, vocab: int, seed: int = 0,
               num_steps: int = 1) -> StepPlan:  # fmt: skip
    """A plan with one prefill chunk of ``prefill`` tokens and ``decode`` one-token decodes.

    With ``num_steps`` > 1 (decodes only) the decodes run that many sub-steps, as the
    scheduler's multi-step plans do, and their block tables cover the extra tokens.
    """
    greedy = SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)
    seqs = []
    blocks.next = 0
    # Token ids do not change the cost of a step; small ones keep big plans cheap to hold.
    pattern = [(seed + t) % min(vocab, 251) for t in range(251)]

    def tokens(n: int) -> list[int]:
        return (pattern * (n // len(pattern) + 1))[:n]

    if prefill:
        prior = context if decode == 0 else 0
        total = prior + prefill
        req = Request("p", tokens(total), greedy)
        seqs.append(standalone_seq(req, prior, prefill, blocks.table(total), True))
    for i in range(decode):
        req = Request(f"d{i}", tokens(context), greedy)
        seqs.append(standalone_seq(req, context - 1, 1, blocks.table(context + num_steps - 1), True))
    return StepPlan(step_id=0, now=0.0, seqs=seqs, num_steps=num_steps, num_batched_tokens=prefill + decode)


def time_executor(executor: Any, plan: StepPlan, repeats: int, warmup: int, stat: str = "mean") -> float:
    """Seconds per ``execute``: the mean over ``repeats`` (or their median).

    The mean is the default because the engine's latencies average over
    the same stalls (other processes, allocator hiccups) that a median hides.
    """
    for _ in range(warmup):
        executor.execute(plan)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        executor.execute(plan)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) if stat == "median" else statistics.fmean(times)


def robust_median(values: list[float], k: float = 3.0) -> float:
    """Median of ``values`` after dropping outliers: those more than ``k`` scaled MADs from the median.

    A stall of another process during one repeat lands far above the rest; the
    median alone resists one such sample in three, this resists several.
    """
    med = statistics.median(values)
    mad = 1.4826 * statistics.median(abs(v - med) for v in values)
    if mad <= 0.0:
        return med
    kept = [v for v in values if abs(v - med) <= k * mad]
    return statistics.median(kept) if kept else med


REDUCERS: dict[str, Callable[[list[float]], float]] = {
    "mean": statistics.fmean, "median": statistics.median, "robust": robust_median,
}  # fmt: skip


def measure_grid(executor: Any, axes: dict[str, list[int]], vocab: int, max_len: int, repeats: int = 3,
                 warmup: int = 1, progress: Callable[[int, int], None] | None = None, stat: str = "mean",
                 multistep: int = 8) -> tuple[list[list[list[float]]], list[list[float]] | None]:  # fmt: skip
    """Executor seconds at every grid point, and per sub-step of ``multistep``-step decode plans.

    Every point is timed once per pass and the passes visit the points in a
    fresh random order, so that a stretch of load from other processes spreads
    over the grid instead of inflating a block of neighbouring points. The
    empty point (0, 0, c) is extrapolated. The second table holds, for each
    (decode sequences, context), the time of one sub-step of a multi-step
    decode plan, which the executor runs in its own loop.
    """
    import random

    P, D, C = axes["prefill_tokens"], axes["decode_seqs"], axes["context_tokens"]
    blocks = _Blocks(executor.num_blocks, executor.block_size)
    points: list[tuple[tuple[int, ...], StepPlan, int]] = []
    for i, p in enumerate(P):
        for j, d in enumerate(D):
            for k, c in enumerate(C):
                if p == 0 and d == 0:
                    continue
                ctx = max(1, min(c, max_len - max(p, 1)))
                points.append(((i, j, k), build_plan(p, d, ctx, blocks, vocab), 1))
    if multistep > 1:
        for j, d in enumerate(D):
            for k, c in enumerate(C):
                if d:
                    ctx = max(1, min(c, max_len - multistep))
                    points.append(((j, k), build_plan(0, d, ctx, blocks, vocab, num_steps=multistep), multistep))
    samples: dict[tuple[int, ...], list[float]] = {key: [] for key, _, _ in points}
    rng = random.Random(0)
    total = len(points) * (warmup + repeats)
    done = 0
    for rep in range(warmup + repeats):
        order = list(points)
        rng.shuffle(order)
        for key, plan, div in order:
            t0 = time.perf_counter()
            executor.execute(plan)
            dt = (time.perf_counter() - t0) / div
            if rep >= warmup:
                samples[key].append(dt)
            done += 1
            if progress is not None:
                progress(done, total)
    reduce = REDUCERS[stat]
    times = [[[0.0 for _ in C] for _ in D] for _ in P]
    multi = [[0.0 for _ in C] for _ in D] if multistep > 1 else None
    for key, vals in samples.items():
        if len(key) == 3:
            times[key[0]][key[1]][key[2]] = reduce(vals)
        elif multi is not None:
            multi[key[0]][key[1]] = reduce(vals)
    # A step with nothing in it never happens; give the grid a value there by extending the
    # prefill axis linearly down to zero, so that small prefills interpolate sensibly.
    if P[0] == 0 and D[0] == 0 and len(P) > 2:
        for k in range(len(C)):
            t1, t2 = times[1][0][k], times[2][0][k]
            slope = (t2 - t1) / (P[2] - P[1])
            times[0][0][k] = max(0.0, t1 - slope * P[1])
    return times, multi


def measure_engine_overhead(engine: Any, num_requests: int = 8, prompt_len: int = 32, output_len: int = 24,
                            vocab: int = 256) -> dict[str, float]:  # fmt: skip
    """Seconds a step costs outside ``execute``: fit ``per_step + per_token * tokens sampled`` by least squares.

    Output processing (detokenisation, stop checks) is per sampled token, so
    a multi-step plan pays the per-token part once per sub-step.
    """
    import random

    rng = random.Random(0)
    xs: list[float] = []
    ys: list[float] = []
    for wave in range(2):
        for i in range(num_requests):
            prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
            engine.add_request(f"overhead-{wave}-{i}", prompt,
                               SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0))  # fmt: skip
        start = len(engine.step_log)
        while engine.has_unfinished():
            t0 = time.perf_counter()
            engine.step()
            wall = time.perf_counter() - t0
            if len(engine.step_log) > start:
                rec = engine.step_log[-1]
                xs.append(float(sum(1 for s in rec.summary[1] if s[3]) * rec.summary[0]))
                ys.append(max(0.0, wall - rec.duration))
    if not xs:
        return {"per_step_s": 0.0, "per_token_s": 0.0}
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var > 0 else 0.0
    b = max(b, 0.0)
    a = max(my - b * mx, 0.0)
    return {"per_step_s": a, "per_token_s": b, "samples": float(n)}


def profile_model(
    model_path: str | None = None,
    grid: str | dict[str, list[int]] = "quick",
    dtype: str = "auto",
    block_size: int = 16,
    max_num_batched_tokens: int = 2048,
    max_num_seqs: int = 64,
    kv_cache_memory: int = 512 << 20,
    repeats: int = 5,
    warmup: int = 1,
    stat: str = "robust",
    multistep: int = 8,
    measure_overhead: bool = True,
    measure_hardware: bool = True,
    progress: Callable[[int, int], None] | None = None,
    jitter_samples: int = 200,
) -> dict[str, Any]:
    """Profile a checkpoint (default: the bundled model) and return the table."""
    import torch

    from tokenmill.engine import Engine, EngineConfig, resolve_model_path
    from tokenmill.executor.model_executor import ModelExecutor

    path = resolve_model_path(model_path)
    asked = {k: list(v) for k, v in (GRIDS[grid] if isinstance(grid, str) else grid).items()}
    executor = ModelExecutor(path, dtype=dtype, kv_cache_memory=kv_cache_memory, block_size=block_size,
                             max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs)  # fmt: skip
    mc = executor.model_config
    axes, clamped = fit_axes(asked, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                             max_model_len=mc.max_model_len, kv_tokens=executor.num_blocks * block_size,
                             num_blocks=executor.num_blocks)  # fmt: skip
    t0 = time.perf_counter()
    times, multi = measure_grid(executor, axes, mc.vocab_size, mc.max_model_len, repeats, warmup, progress, stat,
                                multistep)  # fmt: skip
    grid_s = time.perf_counter() - t0
    jitter = None
    if jitter_samples:
        from tokenmill.sim.jitter import measure_jitter

        jitter = measure_jitter(executor, jitter_samples)
    del executor
    overhead = {"per_step_s": 0.0, "per_token_s": 0.0}
    if measure_overhead:
        engine = Engine(EngineConfig(model=path, dtype=dtype, kv_cache_memory=64 << 20, block_size=block_size,
                                     max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                     max_decode_steps=1, record_steps=True))  # fmt: skip
        overhead = measure_engine_overhead(engine, vocab=mc.vocab_size)
        del engine
    config = json.loads((Path(path) / "config.json").read_text())
    table: dict[str, Any] = {
        "format": FORMAT,
        "model": {"name": Path(path).name, "path": str(path), "config": config},
        "dtype": str(mc.dtype).replace("torch.", ""),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "grid_seconds": grid_s,
        "repeats": repeats,
        "statistic": stat,
        "axes": axes,
        "clamped": clamped,
        "times": times,
        "decode_multistep": {"num_steps": multistep, "times": multi} if multi is not None else None,
        "engine_overhead": overhead,
        "jitter": jitter,
        "engine": {"block_size": block_size, "max_num_batched_tokens": max_num_batched_tokens,
                   "max_num_seqs": max_num_seqs, "max_model_len": mc.max_model_len},  # fmt: skip
    }
    if measure_hardware:
        from tokenmill.sim.hardware import measure_cpu

        table["hardware"] = measure_cpu().to_dict()
    return table
