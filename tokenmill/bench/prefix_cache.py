"""Prefix reuse: shared system prompts with the radix cache on and off, and lpm vs fcfs.

Workload: ``--prefixes`` system prompts of ``--prefix-len`` tokens, each
followed by ``--questions`` questions of ``--question-len`` tokens, in random
order, arriving all at once (``--rate 0``) or as a Poisson stream.

Part 1, cache on vs off (fcfs, a cache that holds every prefix): TTFT p50,
prompt tokens actually computed, and the token hit rate. Targets: at least
5x lower TTFT p50 and at least 80% of prompt tokens served from the cache.

Part 2, lpm vs fcfs with a cache too small for every prefix
(``--small-cache-blocks``): the hit rate, TTFT and throughput of each.

    python -m tokenmill.bench.prefix_cache                  # sim backend
    python -m tokenmill.bench.prefix_cache --backend engine --prefix-len 200 --questions 8
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

NAME = "prefix_cache"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--prefixes", type=int, default=8, help="number of distinct system prompts")
    g.add_argument("--prefix-len", type=int, default=1000, help="tokens per system prompt")
    g.add_argument("--questions", type=int, default=32, help="questions per system prompt")
    g.add_argument("--question-len", type=int, default=50)
    g.add_argument("--output-len", type=int, default=16)
    g.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second; 0: all at once")
    g.add_argument("--vocab", type=int, default=500, help="token ids are drawn from [1, vocab)")
    g.add_argument("--num-blocks", type=int, default=None,
                   help="KV blocks for part 1 (default: every prefix plus a full batch fits)")
    g.add_argument("--small-cache-blocks", type=int, default=None,
                   help="KV blocks for part 2 (default: room for about 3 prefixes plus a batch of questions)")
    g.add_argument("--skip-lpm", action="store_true", help="run part 1 only")
    add_common_arguments(p)


def workload(args: argparse.Namespace) -> list[WorkItem]:
    rng = random.Random(args.seed)
    prefixes = [random_tokens(rng, args.prefix_len, args.vocab) for _ in range(args.prefixes)]
    pairs = [(p, q) for p in range(args.prefixes) for q in range(args.questions)]
    rng.shuffle(pairs)
    arrivals = poisson_arrivals(len(pairs), args.rate, rng)
    return [
        WorkItem(f"p{p}q{q}", prefixes[p] + random_tokens(rng, args.question_len, args.vocab), args.output_len, t)
        for (p, q), t in zip(pairs, arrivals, strict=True)
    ]


def blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def run(args: argparse.Namespace) -> int:
    backend = make_backend(args)
    items = workload(args)
    bs = args.block_size
    per_req = blocks(args.question_len + args.output_len, bs) + 1
    big = args.num_blocks or (args.prefixes * blocks(args.prefix_len, bs) + args.max_num_seqs * (blocks(args.prefix_len, bs) + per_req))
    small = args.small_cache_blocks or (3 * blocks(args.prefix_len, bs) + args.max_num_seqs * per_req)
    print(f"# {NAME}: {args.prefixes} prefixes x {args.questions} questions, prefix {args.prefix_len} + question "
          f"{args.question_len} tokens, {args.output_len} output tokens, "
          f"{'all at once' if args.rate <= 0 else f'Poisson {args.rate:g} req/s'}")
    print(f"# backend: {backend.describe()}")

    runs: dict[str, RunResult] = {}
    runs["cache off"] = backend.run(items, SchedParams(big, enable_prefix_caching=False), "cache off")
    runs["cache on"] = backend.run(items, SchedParams(big, enable_prefix_caching=True), "cache on")
    off, on = runs["cache off"].summary(), runs["cache on"].summary()
    print(f"\n## part 1: prefix cache on vs off (fcfs, {big} blocks of {bs} tokens)")
    cols = [("label", "run", ""), ("ttft_p50_s", "TTFT p50", "s"), ("ttft_p90_s", "TTFT p90", "s"),
            ("prefill_tokens_computed", "prefill tokens", ""), ("token_hit_rate", "hit rate", "%"),
            ("output_tokens_per_s", "out tok/s", ""), ("duration_s", "makespan", "s")]  # fmt: skip
    print_table([off, on], cols)
    ttft_ratio = ratio(off["ttft_p50_s"], on["ttft_p50_s"])
    prefill_ratio = ratio(off["prefill_tokens_computed"], on["prefill_tokens_computed"])
    print(f"TTFT p50 off/on: {ttft_ratio:.2f}x (target >= 5x: {'met' if ttft_ratio and ttft_ratio >= 5 else 'NOT met'})")
    print(f"prefill tokens computed off/on: {prefill_ratio:.2f}x")
    print(f"token hit rate with the cache: {on['token_hit_rate']:.1%} "
          f"(target >= 80%: {'met' if on['token_hit_rate'] >= 0.8 else 'NOT met'})")

    part2: dict[str, Any] = {}
    if not args.skip_lpm:
        for policy in ("fcfs", "lpm"):
            runs[f"{policy} small"] = backend.run(items, SchedParams(small, policy=policy), f"{policy}, small cache")
        f, lp = runs["fcfs small"].summary(), runs["lpm small"].summary()
        print(f"\n## part 2: lpm vs fcfs, cache of {small} blocks ({small * bs} tokens) for "
              f"{args.prefixes} prefixes of {args.prefix_len} tokens")
        print_table([f, lp], cols + [("preemptions", "preemptions", "")])
        part2 = {
            "hit_rate_lpm_minus_fcfs": lp["token_hit_rate"] - f["token_hit_rate"],
            "ttft_p50_fcfs_over_lpm": ratio(f["ttft_p50_s"], lp["ttft_p50_s"]),
            "prefill_tokens_fcfs_over_lpm": ratio(f["prefill_tokens_computed"], lp["prefill_tokens_computed"]),
            "throughput_lpm_over_fcfs": ratio(lp["output_tokens_per_s"], f["output_tokens_per_s"]),
        }
        print(f"hit rate lpm {lp['token_hit_rate']:.1%} vs fcfs {f['token_hit_rate']:.1%}; "
              f"TTFT p50 fcfs/lpm {part2['ttft_p50_fcfs_over_lpm']:.2f}x; "
              f"prefill tokens fcfs/lpm {part2['prefill_tokens_fcfs_over_lpm']:.2f}x; "
              f"throughput lpm/fcfs {part2['throughput_lpm_over_fcfs']:.2f}x")

    d = out_dir(args, NAME)
    payload = {
        "benchmark": NAME,
        "command": " ".join(sys.argv),
        "backend": backend.describe(),
        "args": args_record(args),
        "blocks": {"part1": big, "part2": small},
        "runs": {k: r.summary() for k, r in runs.items()},
        "ratios": {"ttft_p50_off_over_on": ttft_ratio, "prefill_tokens_off_over_on": prefill_ratio, **part2},
    }
    write_json(d / f"{NAME}.json", payload)
    if not args.no_plot:
        plot(runs, d / f"{NAME}.png", backend.name)
    print(f"\nwrote {d / f'{NAME}.json'}" + ("" if args.no_plot else f" and {d / f'{NAME}.png'}"))
    return 0


def plot(runs: dict[str, RunResult], path: Any, backend: str) -> None:
    fig, ax = new_figure(3, f"prefix reuse ({backend} backend)")
    for key in ("cache off", "cache on"):
        t = sorted(runs[key].ttfts())
        ax[0].plot(t, [(i + 1) / len(t) for i in range(len(t))], label=key)
    ax[0].set_xscale("log")
    ax[0].set_xlabel("TTFT (s)")
    ax[0].set_ylabel("fraction of requests")
    ax[0].set_title("TTFT CDF, fcfs")
    ax[0].legend()
    keys = [k for k in runs]
    ax[1].bar(keys, [runs[k].prefill_tokens for k in keys], color="tab:gray")
    ax[1].set_title("prompt tokens computed")
    ax[1].tick_params(axis="x", rotation=30)
    ax[2].bar(keys, [100 * runs[k].hit_rate for k in keys], color="tab:green")
    ax[2].set_title("token hit rate (%)")
    ax[2].set_ylim(0, 100)
    ax[2].tick_params(axis="x", rotation=30)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    return script_main(NAME, __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
