"""Reports of a simulated run: JSON, PNG plots and a printed table.

The JSON holds the benchmark summary (TTFT / TPOT / ITL / E2E mean and
percentiles in ms, throughputs, goodput, SLO attainment), the configuration,
per-replica statistics and the time series (cluster-mean KV usage, total
waiting and running requests, output tokens per second). The PNG has six
panels: CDFs of TTFT, TPOT and E2E latency, output throughput, KV usage and
queue depth over time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from tokenmill.sim.config import SimResult


def _clean(x: Any) -> Any:
    """NaN and infinities become null so that the JSON is standard."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        return _clean(x.item())
    return x


def write_json(result: SimResult, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    data = result.to_dict()
    if extra:
        data.update(extra)
    Path(path).write_text(json.dumps(_clean(data), indent=1))


def plot(result: SimResult, path: str | Path, title: str = "") -> None:
    """Six panels: latency CDFs (TTFT, TPOT, E2E), throughput, KV usage and queue depth over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = result.records.arrays() if len(result.records) else None
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, key, label in zip(axes[0], ("ttft", "tpot", "e2e"), ("TTFT", "TPOT", "E2E latency"), strict=True):
        if a is not None:
            v = a[key][~np.isnan(a[key])] * 1000
            v.sort()
            if v.size:
                ax.plot(v, np.arange(1, v.size + 1) / v.size)
                for q, ls in ((0.5, ":"), (0.9, "--"), (0.99, "-.")):
                    ax.axvline(np.quantile(v, q), color="grey", ls=ls, lw=0.8, label=f"p{int(q * 100)}")
            slo = result.summary.get("slo", {}).get({"ttft": "ttft_s", "tpot": "tpot_s"}.get(key, ""), None)
            if slo:
                ax.axvline(slo * 1000, color="red", lw=1, label="SLO")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel(f"{label} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{label} CDF")
        ax.grid(alpha=0.3)
    ts = result.throughput_series
    axes[1][0].plot(ts["t"], ts["output_tokens_per_s"])
    axes[1][0].set_title("output throughput")
    axes[1][0].set_ylabel("tokens / s")
    s = result.series
    axes[1][1].plot(s["t"], [100 * x for x in s["kv_usage"]])
    axes[1][1].set_title("KV cache usage (mean over replicas)")
    axes[1][1].set_ylabel("% of blocks owned")
    axes[1][2].plot(s["t"], s["waiting"], label="waiting")
    axes[1][2].plot(s["t"], s["running"], label="running")
    axes[1][2].set_title("queue depth (all replicas)")
    axes[1][2].set_ylabel("requests")
    axes[1][2].legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("simulated time (s)")
        ax.grid(alpha=0.3)
    sm = result.summary
    head = title or "tokenmill sim"
    if sm.get("completed"):
        head += (f" — {sm['completed']} requests, {sm['request_throughput']:.2f} req/s, "
                 f"{sm['output_throughput']:.0f} tok/s, goodput {sm['goodput']:.2f} req/s "
                 f"({100 * sm['slo_attainment']:.1f}% within SLO)")  # fmt: skip
    fig.suptitle(head, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of the headline numbers, for printing."""
    if not summary.get("completed"):
        return [("completed requests", "0"), ("rejected", str(summary.get("rejected", 0)))]

    def ms(d: dict[str, Any]) -> str:
        if d.get("mean") is None:
            return "-"
        return f"{d['mean']:.1f} / {d['p50']:.1f} / {d['p90']:.1f} / {d['p99']:.1f}"

    rows = [
        ("completed / rejected / unfinished",
         f"{summary['completed']} / {summary['rejected']} / {summary.get('unfinished', 0)}"),
        ("simulated duration (s)", f"{summary['duration_s']:.1f}"),
        ("request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
        ("output / total token throughput (tok/s)",
         f"{summary['output_throughput']:.0f} / {summary['total_token_throughput']:.0f}"),
        ("TTFT ms (mean / p50 / p90 / p99)", ms(summary["ttft_ms"])),
        ("TPOT ms (mean / p50 / p90 / p99)", ms(summary["tpot_ms"])),
        ("ITL ms (mean / p50 / p90 / p99)", ms(summary["itl_ms"])),
        ("E2E ms (mean / p50 / p90 / p99)", ms(summary["e2e_ms"])),
        ("goodput (req/s) / SLO attainment", f"{summary['goodput']:.2f} / {100 * summary['slo_attainment']:.1f}%"),
        ("goodput per GPU (req/s)", f"{summary.get('goodput_per_gpu', 0.0):.3f}"),
        ("preemptions", str(summary["preemptions"])),
    ]  # fmt: skip
    if "kv_transfers" in summary:
        rows.append(("KV transfers / import failures", f"{summary['kv_transfers']} / {summary['kv_import_failures']}"))
    return rows


def print_summary(result: SimResult, title: str = "tokenmill sim") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for label, value in summary_rows(result.summary):
        table.add_row(label, value)
    table.add_row("wall time (s) / simulated req per wall s",
                  f"{result.wall_time:.2f} / {result.summary.get('completed', 0) / max(result.wall_time, 1e-9):.0f}")
    Console().print(table)
