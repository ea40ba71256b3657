"""Step time as a distribution: measured jitter, and a cost model that draws from it.

A profile's table holds the *median* step time at each grid point (robust to
the stalls of a shared machine); the stalls themselves are not noise to
throw away, though: they are what makes a real engine's p90 and p99 TTFT and
TPOT longer than its median. ``measure_jitter`` times one fixed step many
times and keeps the distribution of ``time / median`` as quantiles;
``JitterCostModel`` multiplies each plan's time by a draw from that
distribution (a k-step plan by the mean of k draws, as its sub-steps stall
independently), with a seeded generator, so a twin run is reproducible and
several seeds give the twin's own spread.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
from typing import Any

from tokenmill.sim.cost_model import CostModel, StepFeatures

NUM_QUANTILES = 101  # 0%, 1%, ..., 100%


def ratio_quantiles(times: list[float]) -> list[float]:
    """Quantiles (0%..100% in 1% steps) of ``times`` divided by their median."""
    if not times:
        raise ValueError("no samples to take quantiles of")
    med = statistics.median(times)
    if med <= 0:
        raise ValueError("the median step time must be positive")
    r = sorted(t / med for t in times)
    n = len(r)
    out = []
    for i in range(NUM_QUANTILES):
        x = i / (NUM_QUANTILES - 1) * (n - 1)
        lo = int(x)
        hi = min(lo + 1, n - 1)
        out.append(r[lo] + (r[hi] - r[lo]) * (x - lo))
    return out


def measure_jitter(executor: Any, samples: int = 200, warmup: int = 3) -> dict[str, Any]:
    """Time a fixed mixed step (a 32-token prefill and 8 decodes at context 128) ``samples`` times."""
    from tokenmill.sim.profiler import _Blocks, build_plan

    plan = build_plan(32, 8, 128, _Blocks(executor.num_blocks, executor.block_size), executor.model_config.vocab_size)
    for _ in range(warmup):
        executor.execute(plan)
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        executor.execute(plan)
        times.append(time.perf_counter() - t0)
    return {"ratio_quantiles": ratio_quantiles(times), "samples": samples, "median_s": statistics.median(times),
            "step": "prefill 32 + 8 decodes at context 128"}  # fmt: skip


class JitterCostModel(CostModel):
    """Another cost model's plan times, each multiplied by a draw from measured ``ratio_quantiles``."""

    name = "jitter"

    def __init__(self, inner: CostModel, ratio_quantiles: list[float], seed: int = 0) -> None:
        if len(ratio_quantiles) < 2 or any(b < a for a, b in itertools.pairwise(ratio_quantiles)):
            raise ValueError("jitter quantiles must be at least two non-decreasing values")
        self.inner = inner
        self.q = list(ratio_quantiles)
        self.rng = random.Random(seed)
        self.seed = seed
        self.mean_ratio = statistics.fmean(self._ratio(u / 1000 + 0.0005) for u in range(1000))

    def _ratio(self, u: float) -> float:
        """Inverse CDF at ``u`` in [0, 1), interpolated between the quantiles."""
        x = u * (len(self.q) - 1)
        i = int(x)
        j = min(i + 1, len(self.q) - 1)
        return self.q[i] + (self.q[j] - self.q[i]) * (x - i)

    def draw(self, num_steps: int = 1) -> float:
        rnd = self.rng.random
        if num_steps == 1:
            return self._ratio(rnd())
        k = min(num_steps, 16)  # past 16 sub-steps the mean is close enough to its limit
        return sum(self._ratio(rnd()) for _ in range(k)) / k

    def step_time(self, f: StepFeatures) -> float:
        return self.inner.step_time(f)

    def decode_time(self, num_seqs: int, context: int, num_steps: int) -> float:
        # Deterministic: the simulator uses it to plan (how many sub-steps fit); draws are per plan.
        return self.inner.decode_time(num_seqs, context, num_steps)

    def plan_time(self, plan: Any) -> float:
        return self.inner.plan_time(plan) * self.draw(plan.num_steps)

    def on_plan_done(self, plan: Any) -> None:
        self.inner.on_plan_done(plan)

    def describe(self) -> dict[str, Any]:
        jitter = {"seed": self.seed, "mean_ratio": self.mean_ratio, "p90": self._ratio(0.9), "p99": self._ratio(0.99)}
        return {**self.inner.describe(), "jitter": jitter}
