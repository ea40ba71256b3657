"""Serving metrics from a simulated run: the numbers a serving benchmark prints, plus time series.

Per request: TTFT (arrival to first token), TPOT (mean time per output token
after the first), E2E latency; per token: ITL (gap between consecutive
tokens of a request). Summaries give mean, p50, p90 and p99 in milliseconds,
request and token throughput, and goodput: requests per second that met
their SLOs (a request's own ``ttft_slo`` / ``tpot_slo``, or the run-wide
ones). ITL is kept in a log-bucketed histogram (0.1% relative resolution)
rather than per token, because a long run produces tens of millions of
tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_RATIO = 1.002
_INV_LOG_RATIO = 1.0 / math.log(_RATIO)


class LogHistogram:
    """Weighted counts of positive values in geometric buckets (plus an exact zero bucket)."""

    __slots__ = ("counts", "zeros", "total", "sum")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.zeros = 0
        self.total = 0
        self.sum = 0.0

    def add(self, x: float, count: int = 1) -> None:
        self.total += count
        self.sum += x * count
        if x <= 0.0:
            self.zeros += count
            return
        i = math.floor(math.log(x) * _INV_LOG_RATIO)
        c = self.counts
        c[i] = c.get(i, 0) + count

    @property
    def mean(self) -> float:
        return self.sum / self.total if self.total else float("nan")

    def quantile(self, q: float) -> float:
        if not self.total:
            return float("nan")
        target = q * self.total
        acc = self.zeros
        if acc >= target and self.zeros:
            return 0.0
        for i in sorted(self.counts):
            acc += self.counts[i]
            if acc >= target:
                return _RATIO ** (i + 0.5)
        return _RATIO ** (max(self.counts) + 0.5)

    def merge(self, other: LogHistogram) -> None:
        for i, c in other.counts.items():
            self.counts[i] = self.counts.get(i, 0) + c
        self.zeros += other.zeros
        self.total += other.total
        self.sum += other.sum


def distribution(values: np.ndarray | list[float], scale: float = 1000.0) -> dict[str, float | None]:
    """mean / p50 / p90 / p99 (times ``scale``: seconds to milliseconds by default)."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": float(a.mean()) * scale, "p50": float(p50) * scale, "p90": float(p90) * scale,
            "p99": float(p99) * scale}  # fmt: skip


@dataclass
class RequestRecords:
    """Finished requests, one entry each, in finishing order."""

    index: list[int] = field(default_factory=list)
    arrival: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    finish: list[float] = field(default_factory=list)
    prompt_len: list[int] = field(default_factory=list)
    output_len: list[int] = field(default_factory=list)
    ttft_slo: list[float] = field(default_factory=list)  # nan: none
    tpot_slo: list[float] = field(default_factory=list)
    client: list[str] = field(default_factory=list)
    slo_class: list[str] = field(default_factory=list)
    preemptions: list[int] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.index)

    def arrays(self) -> dict[str, np.ndarray]:
        arrival = np.array(self.arrival)
        first = np.array(self.first_token)
        finish = np.array(self.finish)
        out = np.array(self.output_len)
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(out > 1, (finish - first) / np.maximum(out - 1, 1), np.nan)
        return {"ttft": first - arrival, "tpot": tpot, "e2e": finish - arrival, "output_len": out,
                "prompt_len": np.array(self.prompt_len), "arrival": arrival, "finish": finish,
                "ttft_slo": np.array(self.ttft_slo), "tpot_slo": np.array(self.tpot_slo)}  # fmt: skip


def slo_met(a: dict[str, np.ndarray], ttft_slo: float | None = None, tpot_slo: float | None = None) -> np.ndarray:
    """Per request: did it meet its SLOs? Run-wide SLOs override the requests' own."""
    n = a["ttft"].size
    ok = np.ones(n, dtype=bool)
    t_slo = np.full(n, ttft_slo) if ttft_slo is not None else a["ttft_slo"]
    p_slo = np.full(n, tpot_slo) if tpot_slo is not None else a["tpot_slo"]
    with np.errstate(invalid="ignore"):
        ok &= np.isnan(t_slo) | (a["ttft"] <= t_slo)
        ok &= np.isnan(p_slo) | np.isnan(a["tpot"]) | (a["tpot"] <= p_slo)
    return ok


def summarize(
    records: RequestRecords,
    itl: LogHistogram,
    ttft_slo: float | None = None,
    tpot_slo: float | None = None,
    num_rejected: int = 0,
) -> dict[str, Any]:
    """The benchmark-style summary of a run."""
    n = len(records)
    if n == 0:
        return {"completed": 0, "rejected": num_rejected}
    a = records.arrays()
    start = float(a["arrival"].min())
    end = float(a["finish"].max())
    duration = max(end - start, 1e-12)
    out_tokens = int(a["output_len"].sum())
    in_tokens = int(a["prompt_len"].sum())
    ok = slo_met(a, ttft_slo, tpot_slo)
    tpot = a["tpot"][~np.isnan(a["tpot"])]
    summary: dict[str, Any] = {
        "completed": n,
        "rejected": num_rejected,
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": n / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": distribution(a["ttft"]),
        "tpot_ms": distribution(tpot),
        "itl_ms": {"mean": itl.mean * 1000, "p50": itl.quantile(0.5) * 1000,
                   "p90": itl.quantile(0.9) * 1000, "p99": itl.quantile(0.99) * 1000},  # fmt: skip
        "e2e_ms": distribution(a["e2e"]),
        "slo": {"ttft_s": ttft_slo, "tpot_s": tpot_slo, "per_request": ttft_slo is None or tpot_slo is None},
        "slo_attainment": float(ok.mean()),
        "goodput": float(ok.sum()) / duration,
        "preemptions": int(sum(records.preemptions)),
        "prefix_cached_tokens": int(sum(records.cached_tokens)),
    }
    classes = sorted(set(records.slo_class) - {""})
    if classes:
        cls = np.array(records.slo_class)
        summary["by_slo_class"] = {}
        for c in classes:
            m = cls == c
            summary["by_slo_class"][c] = {
                "completed": int(m.sum()),
                "slo_attainment": float(ok[m].mean()),
                "goodput": float(ok[m].sum()) / duration,
                "ttft_ms": distribution(a["ttft"][m]),
                "tpot_ms": distribution(a["tpot"][m & ~np.isnan(a["tpot"])]),
            }
    return summary


def merge_series(
    series: list[list[tuple[float, float, int, int]]], width: float
) -> dict[str, list[float]]:
    """Replicas' ``(t, kv usage, waiting, running)`` samples on a common grid of ``width`` s:
    mean KV usage, total waiting and running (each replica's last sample carried forward)."""
    if not any(series):
        return {"t": [], "kv_usage": [], "waiting": [], "running": []}
    end = max(s[-1][0] for s in series if s)
    nb = int(end / width) + 1
    kv = [0.0] * nb
    waiting = [0.0] * nb
    running = [0.0] * nb
    for samples in series:
        # Carry each replica's last sample forward, so idle stretches count.
        last = (0.0, 0, 0)
        pts = iter(samples)
        nxt = next(pts, None)
        for b in range(nb):
            tb = (b + 1) * width
            while nxt is not None and nxt[0] < tb:
                last = nxt[1:]
                nxt = next(pts, None)
            kv[b] += last[0]
            waiting[b] += last[1]
            running[b] += last[2]
    nr = len(series)
    return {"t": [b * width for b in range(nb)], "kv_usage": [x / nr for x in kv],
            "waiting": waiting, "running": running}  # fmt: skip
