"""Numbers and pictures from a ``tokenmill bench serve`` run.

Latencies are reported in milliseconds as mean, std, p50, p90, p99 (and min,
max); goodput counts the requests per second that met every given SLO
(DistServe's definition: Zhong et al., OSDI 2024).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tokenmill.bench.serve_client import RequestResult

SLO_METRICS = ("ttft", "tpot", "itl", "e2e")


def parse_slos(items: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        for part in item.replace(",", " ").split():
            name, sep, value = part.partition(":")
            name = name.strip().lower()
            if not sep or name not in SLO_METRICS:
                raise ValueError(f"bad SLO {part!r}: use NAME:MS with NAME in {', '.join(SLO_METRICS)}")
            try:
                ms = float(value)
            except ValueError:
                raise ValueError(f"bad SLO {part!r}: {value!r} is not a number of milliseconds") from None
            if not ms > 0:
                raise ValueError(f"bad SLO {part!r}: the target must be > 0 ms")
            slos[name] = ms
    return slos


def _percentile(sorted_vals: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = (len(sorted_vals) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(values_s: list[float]) -> dict[str, float | None]:
    """Seconds in, milliseconds out."""
    vals = sorted(v * 1000.0 for v in values_s)
    if not vals:
        return {k: None for k in ("mean", "std", "p50", "p90", "p99", "min", "max")}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    return {
        "mean": mean,
        "std": std,
        "p50": _percentile(vals, 50),
        "p90": _percentile(vals, 90),
        "p99": _percentile(vals, 99),
        "min": vals[0],
        "max": vals[-1],
    }


def _meets(r: RequestResult, slos: dict[str, float]) -> bool:
    if not r.success:
        return False
    checks = {
        "ttft": r.ttft,
        "tpot": r.tpot if r.tpot is not None else 0.0,
        "itl": max(r.itl) if r.itl else 0.0,
        "e2e": r.e2e,
    }
    return all(checks[name] is not None and checks[name] * 1000.0 <= ms for name, ms in slos.items())  # type: ignore[operator]


def build_report(
    results: list[RequestResult], duration: float, slos: dict[str, float], meta: dict[str, Any]
) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    duration = max(duration, 1e-9)
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if not r.success:
            key = (r.error or "unknown")[:200]
            errors[key] = errors.get(key, 0) + 1
    report: dict[str, Any] = {
        **meta,
        "duration_s": duration,
        "num_prompts": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "total_cached_tokens": sum(r.cached_tokens for r in ok),
        "request_throughput": len(ok) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "ttft_ms": summarize([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": summarize([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": summarize([x for r in ok for x in r.itl]),
        "e2e_ms": summarize([r.e2e for r in ok if r.e2e is not None]),
    }
    if slos:
        good = sum(_meets(r, slos) for r in results)
        report["goodput"] = {
            "slos_ms": slos,
            "good_requests": good,
            "requests_per_s": good / duration,
            "fraction": good / len(results) if results else 0.0,
        }
    else:
        report["goodput"] = None
    report["requests"] = [
        {
            "success": r.success,
            "error": r.error,
            "start_s": r.start,
            "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.output_tokens,
            "cached_tokens": r.cached_tokens,
            "ttft_ms": None if r.ttft is None else r.ttft * 1000.0,
            "tpot_ms": None if r.tpot is None else r.tpot * 1000.0,
            "e2e_ms": None if r.e2e is None else r.e2e * 1000.0,
        }
        for r in results
    ]
    return report


def print_report(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    table = Table(title="tokenmill bench serve", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("successful / failed requests", f"{report['completed']} / {report['failed']}"),
        ("duration (s)", f"{report['duration_s']:.2f}"),
        ("input / output tokens", f"{report['total_input_tokens']} / {report['total_output_tokens']}"),
        ("request throughput (req/s)", f"{report['request_throughput']:.2f}"),
        ("output throughput (tok/s)", f"{report['output_throughput']:.1f}"),
        ("total token throughput (tok/s)", f"{report['total_token_throughput']:.1f}"),
    ]
    if report.get("goodput"):
        g = report["goodput"]
        slos = " ".join(f"{k}<={v:g}ms" for k, v in g["slos_ms"].items())
        rows.append((f"goodput (req/s, {slos})", f"{g['requests_per_s']:.2f} ({100 * g['fraction']:.0f}%)"))
    for row in rows:
        table.add_row(*row)
    for name in ("ttft", "tpot", "itl", "e2e"):
        s = report[f"{name}_ms"]
        if s["mean"] is None:
            table.add_row(f"{name.upper()} (ms)", "n/a")
            continue
        table.add_row(
            f"{name.upper()} mean / p50 / p90 / p99 (ms)",
            f"{s['mean']:.1f} / {s['p50']:.1f} / {s['p90']:.1f} / {s['p99']:.1f}",
        )
    console.print(table)
    for err, count in list(report["errors"].items())[:5]:
        console.print(f"[red]{count} x[/red] {err}")


def write_plots(results: list[RequestResult], duration: float, out_dir: Path) -> list[Path]:
    """Latency CDFs (TTFT, TPOT, ITL, E2E) and throughput over time, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    ok = [r for r in results if r.success]
    series = {
        "TTFT": [r.ttft for r in ok if r.ttft is not None],
        "TPOT": [t for r in ok if (t := r.tpot) is not None],
        "ITL": [x for r in ok for x in r.itl],
        "E2E": [r.e2e for r in ok if r.e2e is not None],
    }
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, vals) in zip(axes.flat, series.items(), strict=True):
        vals_ms = sorted(v * 1000.0 for v in vals)
        if vals_ms:
            ys = [(i + 1) / len(vals_ms) for i in range(len(vals_ms))]
            ax.step(vals_ms, ys, where="post")
        ax.set_title(f"{name} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    cdf_path = out_dir / "latency_cdf.png"
    fig.savefig(cdf_path, dpi=100)
    plt.close(fig)

    # Output tokens per second in bins (1 s on long runs, finer on short
    # ones); each request's tokens are spread over the chunks that carried them.
    nbins = min(100, max(20, math.ceil(duration)))
    width = max(duration, 1e-6) / nbins
    tokens = [0.0] * nbins
    running = [0] * nbins
    for r in ok:
        if r.chunk_times:
            per_chunk = r.output_tokens / len(r.chunk_times)
            for t in r.chunk_times:
                tokens[min(nbins - 1, int(t / width))] += per_chunk / width
        end = r.start + (r.e2e or 0.0)
        for b in range(int(r.start / width), min(nbins, int(end / width) + 1)):
            running[b] += 1
    fig, ax = plt.subplots(figsize=(10, 4))
    xs = [(b + 0.5) * width for b in range(nbins)]
    ax.plot(xs, tokens, label="output tokens/s")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("tokens/s")
    ax2 = ax.twinx()
    ax2.plot(xs, running, color="tab:orange", alpha=0.6, label="requests in flight")
    ax2.set_ylabel("requests in flight")
    ax.set_title("throughput over time")
    ax.grid(alpha=0.3)
    fig.legend(loc="upper right")
    fig.tight_layout()
    tp_path = out_dir / "throughput.png"
    fig.savefig(tp_path, dpi=100)
    plt.close(fig)
    return [cdf_path, tp_path]
