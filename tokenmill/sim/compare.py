"""``tokenmill sim compare``: the engine's and the twin's timelines of one workload, side by side.

Both timelines come from trace files (``sim.trace_file``); requests are
matched by id (the twin names requests by their index in the workload, and
``sim validate`` gives the engine's the same names). Requests are taken in
the engine's arrival order, and the first one where the two differ is named:

- a *decision* divergence: a different list of prefill chunks, number of
  preemptions, or number of output tokens; from here on the two made
  different scheduling choices (usually because a different step time let an
  arrival land in a different plan);
- a *timing* divergence: the same decisions, but a time to first token or an
  end-to-end latency further apart than ``rel_tol`` of the engine's (and than
  ``abs_tol`` seconds).

``plot_compare`` draws both as Gantt charts, one row per request (queued in
grey, prefill chunks in orange, decode plans in blue, preemptions as red
crosses, first tokens as green ticks), and marks the divergent requests.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tokenmill.sim.trace_file import RequestTimeline


def _decisions(rt: RequestTimeline) -> tuple[Any, ...]:
    return (tuple(rt.chunks), len(rt.preempted), rt.output_tokens)


def _differs(a: float, b: float, rel_tol: float, abs_tol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) != math.isnan(b)
    return abs(a - b) > max(abs_tol, rel_tol * abs(a))


def divergence(engine: dict[str, RequestTimeline], twin: dict[str, RequestTimeline], rel_tol: float = 0.25,
               abs_tol: float = 0.005) -> dict[str, Any]:  # fmt: skip
    """The first request (in the engine's arrival order) where the twin's decisions or times part from the engine's."""
    order = sorted(engine.values(), key=lambda r: (r.arrival, r.request_id))
    report: dict[str, Any] = {
        "matched": sum(1 for r in order if r.request_id in twin),
        "only_engine": sorted((r for r in engine if r not in twin), key=_natural)[:20],
        "only_twin": sorted((r for r in twin if r not in engine), key=_natural)[:20],
        "first_decision_divergence": None,
        "first_timing_divergence": None,
        "decision_divergences": 0,
    }
    for pos, e in enumerate(order):
        t = twin.get(e.request_id)
        if t is None:
            continue
        de, dt = _decisions(e), _decisions(t)
        if de != dt:
            report["decision_divergences"] += 1
            if report["first_decision_divergence"] is None:
                what = [k for k, x, y in zip(("prefill chunks", "preemptions", "output tokens"), de, dt, strict=True)
                        if x != y]  # fmt: skip
                report["first_decision_divergence"] = {
                    "request_id": e.request_id, "position": pos, "differs_in": what,
                    "engine": {"chunks": list(de[0]), "preemptions": de[1], "output_tokens": de[2]},
                    "twin": {"chunks": list(dt[0]), "preemptions": dt[1], "output_tokens": dt[2]},
                }  # fmt: skip
        if report["first_timing_divergence"] is None:
            lat_e, lat_t = e.finish - e.arrival, t.finish - t.arrival
            if _differs(e.ttft, t.ttft, rel_tol, abs_tol) or _differs(lat_e, lat_t, rel_tol, abs_tol):
                report["first_timing_divergence"] = {
                    "request_id": e.request_id, "position": pos,
                    "engine": {"ttft_s": e.ttft, "latency_s": lat_e},
                    "twin": {"ttft_s": t.ttft, "latency_s": lat_t},
                }  # fmt: skip
    return report


def _natural(rid: str) -> tuple[int, Any]:
    return (0, int(rid)) if rid.isdigit() else (1, rid)


def describe(report: dict[str, Any]) -> list[str]:
    """Human-readable lines for a ``divergence`` report."""
    lines = [f"{report['matched']} requests in both timelines"]
    if report["only_engine"] or report["only_twin"]:
        lines.append(f"only in the engine's: {report['only_engine']}; only in the twin's: {report['only_twin']}")
    d = report["first_decision_divergence"]
    if d is None:
        lines.append("same scheduling decisions for every request (prefill chunks, preemptions, output tokens)")
    else:
        lines.append(f"first decision divergence: request {d['request_id']} (#{d['position']} by arrival) differs in "
                     f"{', '.join(d['differs_in'])}: engine {d['engine']}, twin {d['twin']} "
                     f"({report['decision_divergences']} requests differ in all)")  # fmt: skip
    t = report["first_timing_divergence"]
    if t is None:
        lines.append("no request's TTFT or latency differs beyond the tolerance")
    else:
        lines.append(f"first timing divergence: request {t['request_id']} (#{t['position']}): TTFT "
                     f"{t['engine']['ttft_s'] * 1000:.1f} ms (engine) vs {t['twin']['ttft_s'] * 1000:.1f} ms (twin), "
                     f"latency {t['engine']['latency_s'] * 1000:.1f} vs {t['twin']['latency_s'] * 1000:.1f} ms")  # fmt: skip
    return lines


def plot_compare(engine: dict[str, RequestTimeline], twin: dict[str, RequestTimeline], path: str | Path,
                 report: dict[str, Any] | None = None, max_requests: int = 150, title: str = "") -> None:  # fmt: skip
    """Engine (left) and twin (right) Gantt charts of the first ``max_requests`` requests, divergences marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [r.request_id for r in sorted(engine.values(), key=lambda r: (r.arrival, r.request_id))]
    order += sorted((r for r in twin if r not in engine), key=_natural)
    order = order[:max_requests]
    row = {rid: i for i, rid in enumerate(order)}
    fig, axes = plt.subplots(1, 2, figsize=(14, max(4.0, 0.09 * len(order) + 2)), sharex=True, sharey=True)
    for ax, side, name in ((axes[0], engine, "engine"), (axes[1], twin, "twin")):
        for rid in order:
            rt = side.get(rid)
            if rt is None:
                continue
            y = row[rid]
            h = (y - 0.4, 0.8)
            ax.broken_barh([(a, b - a) for a, b in rt.queued], h, color="0.8")
            ax.broken_barh([(a, max(b - a, 1e-6)) for a, b, _, _ in rt.prefill], h, color="tab:orange")
            ax.broken_barh([(a, max(b - a, 1e-6)) for a, b, _ in rt.decode], h, color="tab:blue")
            if rt.preempted:
                ax.plot(rt.preempted, [y] * len(rt.preempted), "x", color="red", ms=5)
            if not math.isnan(rt.first_token):
                ax.plot([rt.first_token], [y], "|", color="tab:green", ms=7, mew=2)
        ax.set_title(name)
        ax.set_xlabel("seconds from the first arrival")
        if report:
            for key, color in (("first_decision_divergence", "red"), ("first_timing_divergence", "purple")):
                d = report.get(key)
                if d and d["request_id"] in row:
                    ax.axhspan(row[d["request_id"]] - 0.5, row[d["request_id"]] + 0.5, color=color, alpha=0.15)
    axes[0].set_ylabel("request (engine arrival order)")
    axes[0].invert_yaxis()
    if len(order) <= 40:
        axes[0].set_yticks(range(len(order)), order)
    head = title or "engine vs twin"
    if report:
        d, t = report.get("first_decision_divergence"), report.get("first_timing_divergence")
        head += (f"\nfirst decision divergence: request {d['request_id']}" if d else "\nsame decisions")
        head += f"; first timing divergence: request {t['request_id']}" if t else "; times within tolerance"
    fig.suptitle(head)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color="0.8", label="queued"), Patch(color="tab:orange", label="prefill chunk"),
                        Patch(color="tab:blue", label="decode plan")], loc="lower center", ncol=3)  # fmt: skip
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
