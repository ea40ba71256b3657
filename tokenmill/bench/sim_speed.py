"""How fast the twin simulates: simulated requests and steps per wall second, 1 and 64 replicas.

The configuration is the one a simpler peer simulator (its own scheduler, no
KV blocks, no prefix cache) was timed on: Llama-2-70B with tensor parallelism
8 on H100s (roofline cost model), Azure conversation-trace lengths resampled
under Poisson arrivals, 2 requests per second per replica (64 replicas at 128
req/s). tokenmill's twin runs the real core scheduler, KV manager and router.

    python -m tokenmill.bench.sim_speed                       # 1 and 64 replicas, 100,000 requests
    python -m tokenmill.bench.sim_speed --requests 20000 --replicas 64
    python -m tokenmill.bench.sim_speed --targets             # the two speed targets, checked

``--targets`` runs the two figures the twin is held to, with the prefix cache
on: at least 5,000 simulated requests per wall second at 64 replicas (100,000
requests at 128 req/s), and 1,000,000 requests on 1,000 replicas (2,000
req/s) in under 10 minutes of wall time. Wall time depends on what else the
machine runs, so each row also prints CPU time and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from typing import Any

PEER_REQUESTS_PER_S = 1000.0  # the peer simulator on this machine: 100,000 requests in ~108 s
TARGET_REQUESTS_PER_S = 5000.0  # at 64 replicas, 100,000 requests
TARGET_MILLION_S = 600.0  # 1,000,000 requests on 1,000 replicas
TARGET_RUNS = [(64, 100_000), (1000, 1_000_000)]  # (replicas, requests) of the two targets


def build(replicas: int, requests: int, rate_per_replica: float, router: str, prefix_caching: bool,
          max_decode_steps: int, seed: int) -> tuple[Any, Any]:  # fmt: skip
    from tokenmill.core.scheduler import SchedulerConfig
    from tokenmill.sim import workload as W
    from tokenmill.sim.config import PoolConfig, SimConfig
    from tokenmill.sim.hardware import get_hardware
    from tokenmill.sim.model_spec import ModelShape
    from tokenmill.sim.roofline import RooflineCostModel

    model = ModelShape.load("llama-2-70b")
    cm = RooflineCostModel(model, get_hardware("h100"), tp=8)
    sched = SchedulerConfig(
        num_blocks=cm.num_kv_blocks(16), block_size=16, max_num_seqs=256, max_num_batched_tokens=8192,
        max_model_len=model.max_model_len, enable_prefix_caching=prefix_caching, max_decode_steps=max_decode_steps,
    )  # fmt: skip
    wl = W.from_azure_csv(num_requests=requests, arrival="poisson", rate=rate_per_replica * replicas, seed=seed)
    wl.clip(model.max_model_len)
    cfg = SimConfig(PoolConfig(sched, cm, replicas, router=router, gpus_per_replica=8))
    return wl, cfg


def run_one(replicas: int, requests: int, args: argparse.Namespace) -> dict[str, Any]:
    from tokenmill.sim.simulator import Simulator

    t0 = time.perf_counter()
    wl, cfg = build(replicas, requests, args.rate_per_replica, args.router, not args.no_prefix_caching,
                    args.max_decode_steps, args.seed)  # fmt: skip
    setup = time.perf_counter() - t0
    sim = Simulator(wl, cfg)
    c0 = time.process_time()
    w0 = time.perf_counter()
    res = sim.run()
    wall = time.perf_counter() - w0
    cpu = time.process_time() - c0
    s = res.summary
    return {
        "replicas": replicas, "requests": requests, "rate": args.rate_per_replica * replicas,
        "router": args.router, "prefix_caching": not args.no_prefix_caching,
        "wall_s": wall, "cpu_s": cpu, "setup_s": setup,
        "requests_per_wall_s": s["completed"] / wall, "steps_per_wall_s": res.num_steps / wall,
        "requests_per_cpu_s": s["completed"] / cpu,
        "plans": res.num_plans, "steps": res.num_steps, "completed": s["completed"],
        "sim_ttft_p50_ms": s["ttft_ms"]["p50"], "sim_tpot_p50_ms": s["tpot_ms"]["p50"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 64])
    p.add_argument("--requests", type=int, default=100_000, help="requests for the largest replica count")
    p.add_argument("--single-requests", type=int, default=10_000, help="requests for 1 replica")
    p.add_argument("--rate-per-replica", type=float, default=2.0)
    p.add_argument("--router", default="round_robin")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--max-decode-steps", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--targets", action="store_true",
                   help="run the two target figures: 64 replicas x 100,000 and 1,000 replicas x 1,000,000 requests")  # fmt: skip
    args = p.parse_args(argv)
    if args.targets:
        runs = list(TARGET_RUNS)
    else:
        runs = [(n, args.single_requests if n == 1 else args.requests) for n in args.replicas]
    rows = []
    for n, reqs in runs:
        row = run_one(n, reqs, args)
        row["load_avg"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        rows.append(row)
        print(f"{n:4d} replica(s) {row['requests']:7d} requests: {row['requests_per_wall_s']:8.0f} req/s  "
              f"{row['steps_per_wall_s']:9.0f} steps/s  (wall {row['wall_s']:.1f} s, cpu {row['cpu_s']:.1f} s, "
              f"{row['requests_per_cpu_s']:.0f} req per cpu-s; {row['plans']} plans for {row['steps']} steps)  "
              f"vs peer {row['requests_per_wall_s'] / PEER_REQUESTS_PER_S:.1f}x; load average "
              f"{' '.join(f'{x:.2f}' for x in row['load_avg'] or [])}", flush=True)  # fmt: skip
    if args.targets:
        a, b = rows
        print(f"target 1: >= {TARGET_REQUESTS_PER_S:,.0f} req per wall s at {a['replicas']} replicas: "
              f"{a['requests_per_wall_s']:,.0f} ({'met' if a['requests_per_wall_s'] >= TARGET_REQUESTS_PER_S else 'not met'}; "
              f"{a['requests_per_cpu_s']:,.0f} req per CPU s)")  # fmt: skip
        print(f"target 2: {b['requests']:,} requests on {b['replicas']:,} replicas in < {TARGET_MILLION_S:.0f} s wall: "
              f"{b['wall_s']:.0f} s ({'met' if b['wall_s'] < TARGET_MILLION_S else 'not met'}; {b['cpu_s']:.0f} s CPU)")  # fmt: skip
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    meta = {"python": sys.version.split()[0], "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_avg_1m": load, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip
    print(f"load average {load}, peak RSS {meta['max_rss_mb']:.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": rows, "meta": meta}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
