"""Overload with SLO classes: goodput of the slo policy vs fcfs at 1.5x capacity.

First a calibration run measures capacity: a burst of ``--calib-requests``
requests of the workload's shape under fcfs gives requests per second and
the time per output token of a full batch. Then ``--requests`` requests
arrive as a Poisson stream at ``--load`` times that capacity, half of them
interactive (priority 0, TTFT SLO ``--ttft-slo``), half batch (priority 1,
TTFT SLO ``--batch-ttft-mult`` times longer); both must keep the mean time
per output token within ``--tpot-slo``. SLOs default to multiples of what
calibration measured, so the same command means the same thing on either
backend.

Goodput is the number of requests that met both their TTFT and TPOT SLOs
(and that per second). Under fcfs the queue grows without bound and soon
every request is late; the slo policy serves least slack first and relegates
requests that can no longer make it, so most of capacity goes to requests
that still can. Target: slo goodput at least 2x fcfs.

    python -m tokenmill.bench.slo
    python -m tokenmill.bench.slo --backend engine --requests 60 --calib-requests 24
"""

from __future__ import annotations

import argparse
import random
import sys
from typing import Any

from tokenmill.bench.backends import SchedParams, make_backend
from tokenmill.bench.harness import (
    RunResult,
    WorkItem,
    add_common_arguments,
    args_record,
    new_figure,
    out_dir,
    poisson_arrivals,
    print_table,
    random_tokens,
    ratio,
    save_figure,
    script_main,
    write_json,
)

NAME = "slo"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--requests", type=int, default=600)
    g.add_argument("--load", type=float, default=1.5, help="arrival rate as a multiple of measured capacity")
    g.add_argument("--calib-requests", type=int, default=200)
    g.add_argument("--prompt-len", type=int, nargs=2, default=[64, 512], metavar=("MIN", "MAX"))
    g.add_argument("--output-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    g.add_argument("--interactive-frac", type=float, default=0.5)
    g.add_argument("--ttft-slo", type=float, default=None,
                   help="interactive TTFT SLO in seconds (default: 10 mean service intervals, 10 / capacity)")
    g.add_argument("--batch-ttft-mult", type=float, default=4.0, help="batch TTFT SLO over the interactive one")
    g.add_argument("--tpot-slo", type=float, default=None,
                   help="TPOT SLO in seconds (default: 1.5x the calibrated full-batch time per output token)")
    g.add_argument("--num-blocks", type=int, default=None, help="KV blocks (default: a full batch of the longest requests)")
    g.add_argument("--vocab", type=int, default=500)
    add_common_arguments(p, max_num_seqs=32)


def shapes(args: argparse.Namespace, rng: random.Random, n: int) -> list[tuple[list[int], int, int]]:
    """(prompt, output length, priority) for ``n`` requests."""
    out = []
    for _ in range(n):
        prio = 0 if rng.random() < args.interactive_frac else 1
        out.append((random_tokens(rng, rng.randint(*args.prompt_len), args.vocab), rng.randint(*args.output_len), prio))
    return out


def run(args: argparse.Namespace) -> int:
    backend = make_backend(args)
    rng = random.Random(args.seed)
    bs = args.block_size
    num_blocks = args.num_blocks or args.max_num_seqs * (-(-(args.prompt_len[1] + args.output_len[1]) // bs) + 1)
    print(f"# {NAME}: {args.requests} requests at {args.load:g}x capacity, prompts {args.prompt_len[0]}-"
          f"{args.prompt_len[1]} tokens, outputs {args.output_len[0]}-{args.output_len[1]} tokens, "
          f"{args.interactive_frac:.0%} interactive; {num_blocks} KV blocks")
    print(f"# backend: {backend.describe()}")

    calib_items = [WorkItem(f"c{i}", p, o, 0.0) for i, (p, o, _) in enumerate(shapes(args, rng, args.calib_requests))]
    calib = backend.run(calib_items, SchedParams(num_blocks), "calibration").summary()
    capacity = calib["requests"] / calib["duration_s"]
    tpot_sat = calib["tpot_mean_s"]
    ttft_slo = args.ttft_slo or 10.0 / capacity
    tpot_slo = args.tpot_slo or 1.5 * tpot_sat
    batch_ttft = args.batch_ttft_mult * ttft_slo
    rate = args.load * capacity
    print(f"# calibration: capacity {capacity:.2f} req/s, full-batch TPOT {tpot_sat * 1e3:.2f} ms -> arrival rate "
          f"{rate:.2f} req/s; SLOs: TTFT {ttft_slo:.3f} s (interactive) / {batch_ttft:.3f} s (batch), "
          f"TPOT {tpot_slo * 1e3:.2f} ms")

    arrivals = poisson_arrivals(args.requests, rate, rng)
    items = [
        WorkItem(f"r{i}", p, o, t, priority=prio, ttft_slo=ttft_slo if prio == 0 else batch_ttft, tpot_slo=tpot_slo)
        for i, ((p, o, prio), t) in enumerate(zip(shapes(args, rng, args.requests), arrivals, strict=True))
    ]
    runs: dict[str, RunResult] = {
        "fcfs": backend.run(items, SchedParams(num_blocks, policy="fcfs"), "fcfs"),
        "slo": backend.run(items, SchedParams(num_blocks, policy="slo"), "slo"),
    }
    rows = []
    for r in runs.values():
        row: dict[str, Any] = r.summary()
        for prio, name in ((0, "interactive"), (1, "batch")):
            recs = [x for x in r.records if x.priority == prio]
            row[f"good_{name}"] = f"{sum(x.meets_slo() for x in recs)}/{len(recs)}"
        row["ttft_met"] = sum(1 for x in r.records if x.ttft is not None and x.ttft <= (x.ttft_slo or 1e18))
        rows.append(row)
    print()
    print_table(rows, [
        ("label", "policy", ""), ("goodput_requests", "met SLO", ""), ("goodput_per_s", "goodput req/s", ""),
        ("good_interactive", "interactive", ""), ("good_batch", "batch", ""), ("ttft_met", "TTFT met", ""),
        ("ttft_p50_s", "TTFT p50", "s"), ("tpot_mean_s", "TPOT mean", "s"),
        ("output_tokens_per_s", "out tok/s", ""), ("preemptions", "preemptions", ""),
    ])  # fmt: skip
    g = ratio(runs["slo"].goodput()[0], runs["fcfs"].goodput()[0])
    print(f"goodput slo/fcfs: {g:.2f}x (target >= 2x: {'met' if g and g >= 2 else 'NOT met'})"
          if g is not None else "goodput slo/fcfs: n/a (fcfs met no SLO at all)")

    d = out_dir(args, NAME)
    write_json(d / f"{NAME}.json", {
        "benchmark": NAME, "command": " ".join(sys.argv), "backend": backend.describe(), "args": args_record(args),
        "calibration": {**calib, "capacity_req_per_s": capacity},
        "slo": {"ttft_interactive_s": ttft_slo, "ttft_batch_s": batch_ttft, "tpot_s": tpot_slo, "rate": rate},
        "runs": {r["label"]: r for r in rows}, "goodput_slo_over_fcfs": g,
    })  # fmt: skip
    if not args.no_plot:
        fig, ax = new_figure(3, f"SLO classes at {args.load:g}x capacity ({backend.name} backend)")
        for a, (name, r) in zip(ax[:2], runs.items(), strict=True):
            for prio, color, label in ((0, "tab:red", "interactive"), (1, "tab:blue", "batch")):
                recs = [x for x in r.records if x.priority == prio and x.ttft is not None]
                a.scatter([x.arrival for x in recs], [x.ttft for x in recs], s=4, color=color, label=label)
            a.axhline(ttft_slo, color="tab:red", ls="--", lw=0.8)
            a.axhline(batch_ttft, color="tab:blue", ls="--", lw=0.8)
            a.set_yscale("log")
            a.set_title(f"{name}: TTFT by arrival time (dashed: SLOs)")
            a.set_xlabel("arrival (s)")
            a.set_ylabel("TTFT (s)")
            a.legend(markerscale=3)
        names = list(runs)
        ax[2].bar(names, [runs[n].goodput()[0] for n in names], color=["tab:gray", "tab:green"])
        ax[2].set_title(f"requests meeting their SLO (of {args.requests})")
        save_figure(fig, d / f"{NAME}.png")
    print(f"\nwrote {d / f'{NAME}.json'}" + ("" if args.no_plot else f" and {d / f'{NAME}.png'}"))
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(NAME, __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
