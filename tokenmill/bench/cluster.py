"""``tokenmill bench cluster``: one load on one process and on Ray replicas, and what the Ray hop costs.

Each deployment is a ``tokenmill serve`` process of its own, started,
warmed up, measured with ``tokenmill bench serve`` and stopped, in turn, for
``--rounds`` rounds (interleaved, so that a machine whose load drifts
touches every deployment alike):

- ``single2``: one engine in the server's process, two torch threads;
- ``single1``: the same with one thread;
- ``replicas1``: ``--replicas 1 --threads-per-replica 1`` (one Ray actor);
- ``replicas2``: ``--replicas 2 --threads-per-replica 1``;
- ``pd11``: ``--pd 1:1 --threads-per-replica 1``.

Two loads per deployment: a throughput run (``--num-prompts`` at
``--max-concurrency``) and a latency run at concurrency 1
(``--hop-prompts`` short requests). The TTFT the Ray hop adds is the median
TTFT at concurrency 1 of ``replicas1`` minus that of ``single1``: the same
engine with the same thread count, with and without the front end and Ray
between the HTTP handler and the engine. That difference also holds what
moving the engine out of the server's process gains (its thread no longer
shares the server's interpreter), so the hop is also measured directly: the
front end's ``tokenmill_ray_hop_seconds`` histogram (the add call until the
replica's engine took the request, plus the first token's way back), read
before and after the concurrency-1 run; its median is interpolated within
the histogram's buckets.

    tokenmill bench cluster --rounds 2 --result-file cluster.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEPLOYMENTS: dict[str, tuple[list[str], int]] = {  # name -> (serve flags, OMP threads of the server process)
    "single2": ([], 2),
    "single1": ([], 1),
    "replicas1": (["--replicas", "1", "--threads-per-replica", "1"], 1),
    "replicas2": (["--replicas", "2", "--threads-per-replica", "1"], 1),
    "pd11": (["--pd", "1:1", "--threads-per-replica", "1"], 1),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--deployments", default=",".join(DEPLOYMENTS), help="which, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-concurrency", type=int, default=16)
    parser.add_argument("--hop-prompts", type=int, default=40, help="requests of the concurrency-1 latency run")
    parser.add_argument("--kv-cache-memory", default="256MiB", help="KV cache per engine")
    parser.add_argument("--result-file", default=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model: str, flags: list[str], threads: int, kv: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "tokenmill.server", model, "--port", str(port), "--kv-cache-memory", kv,
           "--log-level", "warning", *flags]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


def _load(url: str, out: Path, *flags: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "tokenmill.cli", "bench", "serve", "--base-url", url, "--workload", "fixed",
           "--result-file", str(out), *flags]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def _hop_buckets(url: str) -> dict[float, float]:
    """The front end's ``tokenmill_ray_hop_seconds`` buckets (upper bound -> cumulative count); {} without it."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[float, float] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        if fam.name == "tokenmill_ray_hop_seconds":
            for sample in fam.samples:
                if sample.name.endswith("_bucket"):
                    le = float(sample.labels["le"])
                    out[le] = out.get(le, 0.0) + sample.value
    return out


def _median_ms(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The median of the observations between two bucket readings, linear within its bucket."""
    counts = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    if not counts or counts[-1][1] <= 0:
        return None
    half, lo, below = counts[-1][1] / 2, 0.0, 0.0
    for le, cum in counts:
        if cum >= half:
            if le == float("inf"):
                return lo * 1e3
            return (lo + (le - lo) * (half - below) / max(cum - below, 1e-9)) * 1e3
        lo, below = le, cum
    return None


def run(args: argparse.Namespace) -> int:
    from tokenmill.engine import resolve_model_path

    model = resolve_model_path(args.model)
    names = [n.strip() for n in args.deployments.split(",") if n.strip()]
    unknown = set(names) - set(DEPLOYMENTS)
    if unknown:
        print(f"error: unknown deployments {sorted(unknown)}; known: {', '.join(DEPLOYMENTS)}", file=sys.stderr)
        return 2
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    tmp = Path(tempfile.mkdtemp(prefix="tokenmill-bench-cluster-"))
    for r in range(args.rounds):
        for name in names:
            flags, threads = DEPLOYMENTS[name]
            load0 = os.getloadavg()[0]
            proc, url = _serve(model, flags, threads, args.kv_cache_memory, tmp / f"{name}-{r}.log")
            try:
                _load(url, tmp / "warm.json", "--num-prompts", "8", "--max-concurrency", "4", "--input-len",
                      str(args.input_len), "--output-len", "8")  # fmt: skip
                tp = _load(url, tmp / f"{name}-{r}-tp.json", "--num-prompts", str(args.num_prompts),
                           "--max-concurrency", str(args.max_concurrency), "--input-len", str(args.input_len),
                           "--output-len", str(args.output_len), "--seed", str(r))  # fmt: skip
                hop0 = _hop_buckets(url)
                hop = _load(url, tmp / f"{name}-{r}-hop.json", "--num-prompts", str(args.hop_prompts),
                            "--max-concurrency", "1", "--input-len", str(args.input_len), "--output-len", "4",
                            "--seed", str(100 + r))  # fmt: skip
                ray_hop = _median_ms(hop0, _hop_buckets(url))
            finally:
                proc.terminate()
                proc.wait(60)
            row = {"round": r, "load_avg_before": load0, "load_avg_after": os.getloadavg()[0],
                   "output_throughput": tp["output_throughput"], "ttft_p50_ms": tp["ttft_ms"]["p50"],
                   "ttft_p90_ms": tp["ttft_ms"]["p90"], "tpot_p50_ms": tp["tpot_ms"]["p50"],
                   "failed": tp["failed"] + hop["failed"], "c1_ttft_p50_ms": hop["ttft_ms"]["p50"],
                   "c1_ttft_mean_ms": hop["ttft_ms"]["mean"], "c1_ray_hop_p50_ms": ray_hop}  # fmt: skip
            runs[name].append(row)
            print(f"round {r} {name:10s} out tok/s {row['output_throughput']:7.1f}  TTFT p50 {row['ttft_p50_ms']:7.1f} ms"
                  f"  TPOT p50 {row['tpot_p50_ms']:6.1f} ms  | c=1 TTFT p50 {row['c1_ttft_p50_ms']:6.2f} ms"
                  + (f"  Ray hop p50 {ray_hop:5.2f} ms" if ray_hop is not None else "")
                  + f"  (load {load0:.1f})", flush=True)  # fmt: skip
    summary = {n: {k: statistics.median(x[k] for x in rows) for k in rows[0] if k != "round" and rows[0][k] is not None}
               for n, rows in runs.items() if rows}  # fmt: skip
    print("\nmedian over rounds:")
    for n, s in summary.items():
        print(f"  {n:10s} out tok/s {s['output_throughput']:7.1f}  TTFT p50 {s['ttft_p50_ms']:7.1f}  "
              f"TPOT p50 {s['tpot_p50_ms']:6.1f}  c=1 TTFT p50 {s['c1_ttft_p50_ms']:6.2f} ms"
              + (f"  Ray hop p50 {s['c1_ray_hop_p50_ms']:5.2f} ms" if "c1_ray_hop_p50_ms" in s else ""))  # fmt: skip
    if "single1" in summary and "replicas1" in summary:
        hops = [b["c1_ttft_p50_ms"] - a["c1_ttft_p50_ms"] for a, b in zip(runs["single1"], runs["replicas1"], strict=False)]
        print(f"TTFT the Ray hop adds at concurrency 1 (replicas1 - single1, per round): "
              f"{', '.join(f'{h:+.2f}' for h in hops)} ms")  # fmt: skip
        summary["ray_hop_ttft_ms"] = {"per_round": hops, "median": statistics.median(hops)}
    if args.result_file:
        Path(args.result_file).write_text(json.dumps({"runs": runs, "summary": summary, "model": model}, indent=1))
    return 0
