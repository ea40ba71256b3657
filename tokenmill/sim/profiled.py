"""Profiled cost model: interpolate a table of measured step times (``tokenmill profile``).

The table (JSON, written by ``tokenmill.sim.profiler``) holds the real
executor's median step time on a grid of three axes:

- ``prefill_tokens``: new tokens of prompt (or recompute) sequences in the step;
- ``decode_seqs``: one-token decode sequences in the step;
- ``context_tokens``: the mean KV length a decode sequence attends to (or, in
  a step without decodes, the prior context of the prefill chunk).

A step's time is the trilinear interpolation of the table at its features,
extrapolated linearly past the largest grid point (and never below zero),
plus the engine's measured overhead outside the executor: ``per_step_s``
per plan (scheduling, updates) and ``per_token_s`` per sampled token (output
processing), so a k-step plan pays the first once and the second k times.
A multi-step decode plan costs ``k`` sub-steps at its mean context (exact
where the table is linear in context, which it is within a cell), priced from
the table's ``decode_multistep`` section when it has one: the executor runs
the sub-steps of such a plan in its own loop, whose cost per sub-step differs
from that of a one-step plan.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any

from tokenmill.sim.cost_model import CostModel, StepFeatures

FORMAT = "tokenmill-profile/1"


def _locate(axis: list[float], x: float) -> tuple[int, float]:
    """Cell index i and weight w of ``x`` between axis[i] and axis[i+1] (w may exceed 1 past the end)."""
    n = len(axis)
    if n == 1:
        return 0, 0.0
    if x <= axis[0]:
        return 0, 0.0
    i = bisect.bisect_right(axis, x) - 1
    if i >= n - 1:
        i = n - 2  # extrapolate from the last cell
    lo, hi = axis[i], axis[i + 1]
    return i, (x - lo) / (hi - lo)


class ProfiledCostModel(CostModel):
    name = "profiled"

    def __init__(self, table: dict[str, Any], source: str = "") -> None:
        if table.get("format") != FORMAT:
            raise ValueError(f"not a tokenmill profile table (format {table.get('format')!r}, expected {FORMAT!r})")
        axes = table["axes"]
        self.p_axis = [float(x) for x in axes["prefill_tokens"]]
        self.d_axis = [float(x) for x in axes["decode_seqs"]]
        self.c_axis = [float(x) for x in axes["context_tokens"]]
        self.times: list[list[list[float]]] = table["times"]
        shape = (len(self.p_axis), len(self.d_axis), len(self.c_axis))
        if (len(self.times), len(self.times[0]), len(self.times[0][0])) != shape:
            raise ValueError(f"profile table times do not match its axes {shape}")
        for axis in (self.p_axis, self.d_axis, self.c_axis):
            if axis != sorted(axis) or len(set(axis)) != len(axis):
                raise ValueError("profile table axes must be strictly increasing")
        ms = table.get("decode_multistep") or {}
        self.multi: list[list[float]] | None = ms.get("times")
        if self.multi is not None and (len(self.multi), len(self.multi[0])) != shape[1:]:
            raise ValueError("profile table decode_multistep times do not match its axes")
        over = table.get("engine_overhead", {})
        self.overhead = float(over.get("per_step_s", 0.0))
        self.overhead_per_token = float(over.get("per_token_s", over.get("per_seq_s", 0.0)))
        self.table = table
        self.source = source

    @classmethod
    def load(cls, path: str | Path) -> ProfiledCostModel:
        return cls(json.loads(Path(path).read_text()), source=str(path))

    def interpolate(self, prefill_tokens: float, decode_seqs: float, context: float) -> float:
        """Executor seconds at a point of the grid space (no engine overhead)."""
        i, wi = _locate(self.p_axis, prefill_tokens)
        j, wj = _locate(self.d_axis, decode_seqs)
        k, wk = _locate(self.c_axis, context)
        T = self.times
        i1 = min(i + 1, len(self.p_axis) - 1)
        j1 = min(j + 1, len(self.d_axis) - 1)
        k1 = min(k + 1, len(self.c_axis) - 1)

        def lerp(a: float, b: float, w: float) -> float:
            return a + (b - a) * w

        c00 = lerp(T[i][j][k], T[i][j][k1], wk)
        c01 = lerp(T[i][j1][k], T[i][j1][k1], wk)
        c10 = lerp(T[i1][j][k], T[i1][j][k1], wk)
        c11 = lerp(T[i1][j1][k], T[i1][j1][k1], wk)
        t = lerp(lerp(c00, c01, wj), lerp(c10, c11, wj), wi)
        return t if t > 0.0 else 0.0

    def step_time(self, f: StepFeatures) -> float:
        if f.num_decode:
            ctx = f.decode_context / f.num_decode
        else:
            ctx = f.prefill_context
        # a decode's verified drafts are extra rows, as a prefill chunk's tokens are
        p = f.prefill_tokens + f.draft_tokens
        return self.interpolate(p, f.num_decode, ctx) + self.overhead + self.overhead_per_token * f.num_samples

    def _multi_step(self, decode_seqs: float, context: float) -> float:
        """Seconds per sub-step of a multi-step decode plan (bilinear in the decode_multistep table)."""
        assert self.multi is not None
        j, wj = _locate(self.d_axis, decode_seqs)
        k, wk = _locate(self.c_axis, context)
        M = self.multi
        if j == 0 and self.d_axis[0] == 0 and len(self.d_axis) > 1:
            j, wj = 1, 0.0  # the row for zero decodes is empty: below one decode, use one
        j1 = min(j + 1, len(self.d_axis) - 1)
        k1 = min(k + 1, len(self.c_axis) - 1)
        lo = M[j][k] + (M[j][k1] - M[j][k]) * wk
        hi = M[j1][k] + (M[j1][k1] - M[j1][k]) * wk
        t = lo + (hi - lo) * wj
        return t if t > 0.0 else 0.0

    def decode_time(self, num_seqs: int, context: int, num_steps: int) -> float:
        mean_ctx = context / num_seqs + (num_steps - 1) / 2
        if num_steps > 1 and self.multi is not None:
            step = self._multi_step(num_seqs, mean_ctx)
        else:
            step = self.interpolate(0, num_seqs, mean_ctx)
        # The engine schedules once per plan; the executor and output processing work per sub-step.
        return num_steps * (step + self.overhead_per_token * num_seqs) + self.overhead

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "model": self.table.get("model", {}).get("name"),
            "device": self.table.get("device"),
            "dtype": self.table.get("dtype"),
            "engine_overhead_s": self.overhead,
            "engine_overhead_per_token_s": self.overhead_per_token,
        }
