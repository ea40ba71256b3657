"""Fairness between clients: one client sends ten times the other's load; fcfs vs vtc vs dlpm.

Workload: closed-loop users, so both clients stay backlogged and the queue
stays bounded: the light client has ``--light-users`` users, the heavy one
``--heavy-ratio`` times as many; each user sends ``--requests-per-user``
requests one after the other. Each client has its own system prompts
(``--heavy-prefixes`` for the heavy client, one for the light client) of
``--prefix-len`` tokens, then a ``--question-len`` question, and asks for
``--output-len`` tokens (uniform in [1/2, 3/2] of it). The server runs at
most ``--max-num-seqs`` sequences, fewer than there are users.

Reported per policy, over the time both clients have requests: tokens served
to each client (prompt + output), the light client's share, the largest gap
in cumulative service between them, the light client's TTFT, and the token
hit rate and throughput (dlpm keeps prefix locality that vtc gives up).
Under fcfs service follows demand (about 10:1) and the gap grows with time;
under vtc and dlpm the light client gets about half and the gap stays
bounded.

    python -m tokenmill.bench.fairness
    python -m tokenmill.bench.fairness --backend engine --light-users 2 --requests-per-user 3
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
    percentile,
    print_table,
    random_tokens,
    save_figure,
    script_main,
    write_json,
)

NAME = "fairness"
CLIENTS = ("heavy", "light")
POLICIES = ("fcfs", "vtc", "dlpm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--light-users", type=int, default=12)
    g.add_argument("--heavy-ratio", type=int, default=10, help="heavy client users per light client user")
    g.add_argument("--requests-per-user", type=int, default=6)
    g.add_argument("--prefix-len", type=int, default=256)
    g.add_argument("--heavy-prefixes", type=int, default=4, help="distinct system prompts of the heavy client")
    g.add_argument("--question-len", type=int, default=64)
    g.add_argument("--output-len", type=int, default=64)
    g.add_argument("--vocab", type=int, default=500)
    g.add_argument("--num-blocks", type=int, default=None,
                   help="KV blocks (default: three system prompts plus a full batch)")
    g.add_argument("--windows", type=int, default=20, help="windows over the run for the service plot")
    g.add_argument("--quantum", type=float, default=1024.0, help="dlpm deficit quantum (tokens)")
    add_common_arguments(p, max_num_seqs=16)


def workload(args: argparse.Namespace) -> list[WorkItem]:
    rng = random.Random(args.seed)
    prefixes = {
        "heavy": [random_tokens(rng, args.prefix_len, args.vocab) for _ in range(args.heavy_prefixes)],
        "light": [random_tokens(rng, args.prefix_len, args.vocab)],
    }
    users = {"heavy": args.light_users * args.heavy_ratio, "light": args.light_users}
    items = []
    for client in CLIENTS:
        for u in range(users[client]):
            prev = None
            for k in range(args.requests_per_user):
                rid = f"{client}-u{u}-{k}"
                prompt = rng.choice(prefixes[client]) + random_tokens(rng, args.question_len, args.vocab)
                out = rng.randint(max(1, args.output_len // 2), max(1, args.output_len * 3 // 2))
                # First requests start staggered over a few milliseconds, follow-ups right after the previous one.
                items.append(WorkItem(rid, prompt, out, arrival=0.0 if prev else rng.uniform(0, 0.01),
                                      client_id=client, follows=prev))
                prev = rid
    return items


def fairness_metrics(run: RunResult) -> dict[str, Any]:
    last = {c: max((r.finish or 0.0) for r in run.records if r.client_id == c) for c in CLIENTS}
    both = min(last.values())  # both clients have requests up to here
    served = {c: 0 for c in CLIENTS}
    gap = 0
    for t, c, k in sorted(run.service):
        if t > both:
            break
        served[c] += k
        gap = max(gap, abs(served["heavy"] - served["light"]))
    total = sum(served.values())
    return {
        "both_active_s": both,
        "served_heavy": served["heavy"],
        "served_light": served["light"],
        "light_share": served["light"] / total if total else None,
        "max_service_gap_tokens": gap,
        "light_ttft_p50_s": percentile(run.ttfts("light"), 50),
        "light_ttft_p90_s": percentile(run.ttfts("light"), 90),
        "heavy_ttft_p50_s": percentile(run.ttfts("heavy"), 50),
    }


def run(args: argparse.Namespace) -> int:
    backend = make_backend(args)
    items = workload(args)
    bs = args.block_size
    per_req = -(-(args.prefix_len + args.question_len + args.output_len * 3 // 2) // bs) + 1
    num_blocks = args.num_blocks or (3 * -(-args.prefix_len // bs) + args.max_num_seqs * per_req)
    n_users = args.light_users * (args.heavy_ratio + 1)
    print(f"# {NAME}: closed loop, light client {args.light_users} users, heavy client "
          f"{args.light_users * args.heavy_ratio} users, {args.requests_per_user} requests each; "
          f"{n_users} users for {args.max_num_seqs} sequence slots; {num_blocks} KV blocks of {bs} tokens")
    print(f"# backend: {backend.describe()}")
    options = {"fcfs": {}, "vtc": {}, "dlpm": {"quantum": args.quantum}}
    runs = {p: backend.run(items, SchedParams(num_blocks, policy=p, policy_options=options[p]), p) for p in POLICIES}
    rows = [{**r.summary(), **fairness_metrics(r)} for r in runs.values()]
    print()
    print_table(rows, [
        ("label", "policy", ""), ("served_heavy", "served heavy", ""), ("served_light", "served light", ""),
        ("light_share", "light share", "%"), ("max_service_gap_tokens", "max gap (tok)", ""),
        ("light_ttft_p50_s", "light TTFT p50", "s"), ("heavy_ttft_p50_s", "heavy TTFT p50", "s"),
        ("token_hit_rate", "hit rate", "%"), ("output_tokens_per_s", "out tok/s", ""),
        ("both_active_s", "both active", "s"),
    ])  # fmt: skip
    by = {r["label"]: r for r in rows}
    for p in ("vtc", "dlpm"):
        print(f"{p} vs fcfs: light share {by[p]['light_share']:.1%} vs {by['fcfs']['light_share']:.1%}; "
              f"max gap {by[p]['max_service_gap_tokens']} vs {by['fcfs']['max_service_gap_tokens']} tokens; "
              f"light TTFT p50 {by['fcfs']['light_ttft_p50_s'] / by[p]['light_ttft_p50_s']:.2f}x lower; "
              f"throughput {by[p]['output_tokens_per_s'] / by['fcfs']['output_tokens_per_s']:.2f}x")

    d = out_dir(args, NAME)
    windows = {}
    for p, r in runs.items():
        w = max(r.duration / args.windows, 1e-9)
        windows[p] = {"window_s": w, "served": r.service_windows(w, CLIENTS)}
    write_json(d / f"{NAME}.json", {
        "benchmark": NAME, "command": " ".join(sys.argv), "backend": backend.describe(), "args": args_record(args),
        "num_blocks": num_blocks, "runs": by, "windows": windows,
    })  # fmt: skip
    if not args.no_plot:
        fig, ax = new_figure(len(POLICIES), f"tokens served per client per window ({backend.name} backend)")
        for a, p in zip(ax, POLICIES, strict=True):
            w = windows[p]["window_s"]
            for c in CLIENTS:
                series = windows[p]["served"][c]
                a.plot([(i + 0.5) * w for i in range(len(series))], series, marker=".", label=c)
            a.axvline(by[p]["both_active_s"], color="gray", ls="--", lw=0.8)
            a.set_title(f"{p}: light share {by[p]['light_share']:.0%} while both active")
            a.set_xlabel("time (s)")
            a.set_ylabel(f"tokens per {w:.3g} s window")
            a.legend()
        save_figure(fig, d / f"{NAME}.png")
    print(f"\nwrote {d / f'{NAME}.json'}" + ("" if args.no_plot else f" and {d / f'{NAME}.png'}"))
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(NAME, __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
