"""Bimodal output lengths: throughput of multi-bin batching (``bins``) vs fcfs.

Workload: ``--requests`` requests with ``--prompt-len``-token prompts, all
queued at once; a fraction ``--long-frac`` asks for a long output (uniform in
``--long``), the rest for a short one (uniform in ``--short``). The
scheduler is told each request's output length up front
(``predicted_output_len``), exactly or with ``--noise`` relative error.

Four runs, as the throughput (output tokens per second) of each:

- continuous batching (tokenmill's normal mode): ``fcfs`` and ``bins``;
- static batches, the setting of the Multi-Bin Batching paper, where a batch
  runs until its longest request finishes before the next is admitted:
  ``bins`` with one bin (static fcfs) and ``bins`` with ``--bin-edges``.

The paper's gain is in the static setting: a batch lasts as long as its
longest member, so sorting short and long requests into separate batches
stops short ones from holding slots idle. With continuous batching a
finished request's slot is refilled at once, so there is little left to win.

    python -m tokenmill.bench.bins
    python -m tokenmill.bench.bins --backend engine --requests 32 --long 48 64 --short 4 8
"""

from __future__ import annotations

import argparse
import random
import sys

from tokenmill.bench.backends import SchedParams, make_backend
from tokenmill.bench.harness import (
    RunResult,
    WorkItem,
    add_common_arguments,
    args_record,
    new_figure,
    out_dir,
    print_table,
    random_tokens,
    ratio,
    save_figure,
    script_main,
    write_json,
)

NAME = "bins"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--requests", type=int, default=256)
    g.add_argument("--prompt-len", type=int, default=128)
    g.add_argument("--short", type=int, nargs=2, default=[8, 32], metavar=("MIN", "MAX"))
    g.add_argument("--long", type=int, nargs=2, default=[384, 512], metavar=("MIN", "MAX"))
    g.add_argument("--long-frac", type=float, default=0.3)
    g.add_argument("--noise", type=float, default=0.0, help="relative error of the predicted output length")
    g.add_argument("--bin-edges", type=int, nargs="+", default=None,
                   help="bin upper bounds (default: one edge between the short and long modes)")
    g.add_argument("--num-blocks", type=int, default=None, help="KV blocks (default: a full batch of long requests)")
    g.add_argument("--vocab", type=int, default=500)
    add_common_arguments(p, max_num_seqs=32)


def workload(args: argparse.Namespace) -> list[WorkItem]:
    rng = random.Random(args.seed)
    items = []
    for i in range(args.requests):
        lo, hi = args.long if rng.random() < args.long_frac else args.short
        n = rng.randint(lo, hi)
        pred = max(1, round(n * (1 + rng.uniform(-args.noise, args.noise))))
        items.append(WorkItem(f"r{i}", random_tokens(rng, args.prompt_len, args.vocab), n, 0.0, predicted_output_len=pred))
    return items


def run(args: argparse.Namespace) -> int:
    backend = make_backend(args)
    items = workload(args)
    bs = args.block_size
    num_blocks = args.num_blocks or args.max_num_seqs * (-(-(args.prompt_len + args.long[1]) // bs) + 1)
    edges = args.bin_edges or [(args.short[1] + args.long[0]) // 2]
    print(f"# {NAME}: {args.requests} requests, prompt {args.prompt_len}, outputs {args.short[0]}-{args.short[1]} "
          f"({1 - args.long_frac:.0%}) or {args.long[0]}-{args.long[1]} ({args.long_frac:.0%}) tokens, "
          f"prediction noise {args.noise:.0%}; bin edges {edges}; {num_blocks} KV blocks")
    print(f"# backend: {backend.describe()}")
    configs = {
        "fcfs (continuous)": SchedParams(num_blocks, policy="fcfs"),
        "bins (continuous)": SchedParams(num_blocks, policy="bins", policy_options={"bin_edges": edges}),
        "fcfs (static batches)": SchedParams(num_blocks, policy="bins", policy_options={"bin_edges": [], "static": True}),
        "bins (static batches)": SchedParams(num_blocks, policy="bins", policy_options={"bin_edges": edges, "static": True}),
    }
    runs: dict[str, RunResult] = {k: backend.run(items, p, k) for k, p in configs.items()}
    rows = [r.summary() for r in runs.values()]
    print()
    print_table(rows, [
        ("label", "run", ""), ("output_tokens_per_s", "out tok/s", ""), ("duration_s", "makespan", "s"),
        ("ttft_p50_s", "TTFT p50", "s"), ("tpot_mean_s", "TPOT mean", "s"), ("preemptions", "preemptions", ""),
    ])  # fmt: skip
    tp = {k: r.output_throughput() for k, r in runs.items()}
    cont = ratio(tp["bins (continuous)"], tp["fcfs (continuous)"])
    stat = ratio(tp["bins (static batches)"], tp["fcfs (static batches)"])
    best = ratio(tp["bins (static batches)"], tp["fcfs (continuous)"])
    print(f"throughput bins/fcfs: continuous {cont:.2f}x, static batches {stat:.2f}x; "
          f"static bins vs continuous fcfs {best:.2f}x")

    d = out_dir(args, NAME)
    write_json(d / f"{NAME}.json", {
        "benchmark": NAME, "command": " ".join(sys.argv), "backend": backend.describe(), "args": args_record(args),
        "num_blocks": num_blocks, "bin_edges": edges, "runs": {r["label"]: r for r in rows},
        "ratios": {"continuous_bins_over_fcfs": cont, "static_bins_over_fcfs": stat,
                   "static_bins_over_continuous_fcfs": best},
    })  # fmt: skip
    if not args.no_plot:
        fig, ax = new_figure(2, f"bimodal output lengths ({backend.name} backend)")
        names = list(runs)
        ax[0].bar(range(len(names)), [tp[n] for n in names],
                  color=["tab:gray", "tab:green", "silver", "lightgreen"])
        ax[0].set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
        ax[0].set_title("output tokens per second")
        for n in names:
            done = sorted(r.finish for r in runs[n].records if r.finish is not None)
            ax[1].plot(done, range(1, len(done) + 1), label=n)
        ax[1].set_xlabel("time (s)")
        ax[1].set_ylabel("requests finished")
        ax[1].legend(fontsize=8)
        save_figure(fig, d / f"{NAME}.png")
    print(f"\nwrote {d / f'{NAME}.json'}" + ("" if args.no_plot else f" and {d / f'{NAME}.png'}"))
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(NAME, __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
