"""``tokenmill bench throughput|serve``: each benchmark module owns its flags and its run."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

BENCHMARKS = {
    "throughput": ("tokenmill.bench.throughput", "offline generation tokens/s against peers"),
    "serve": ("tokenmill.bench.serve", "open-loop load against an OpenAI-compatible server"),
    "prefix-cache": ("tokenmill.bench.prefix_cache", "shared prefixes: cache on vs off, lpm vs fcfs"),
    "fairness": ("tokenmill.bench.fairness", "two clients, one 10x heavier: fcfs vs vtc vs dlpm"),
    "slo": ("tokenmill.bench.slo", "overload with SLO classes: goodput of slo vs fcfs"),
    "bins": ("tokenmill.bench.bins", "bimodal output lengths: bins vs fcfs throughput"),
    "spec": ("tokenmill.bench.spec", "speculative decoding (self-int8, KJV draft, n-gram) against plain decoding"),
    "kv-transfer": ("tokenmill.bench.kv_transfer", "prefill-to-decode KV transfer through Ray vs a memcpy"),
    "cluster": ("tokenmill.bench.cluster", "one process vs Ray replicas vs P/D under one load; the Ray hop's TTFT"),
    "moe": ("tokenmill.bench.moe", "MoE decode vs transformers; expert offloading hit rate"),
    "lora": ("tokenmill.bench.lora", "a batch mixing LoRA adapters vs the base model alone"),
    "structured": ("tokenmill.bench.structured", "structured output: compile times, decode cost, validity"),
    "contention": ("tokenmill.bench.contention", "batch-1 decode quiet vs beside busy processes"),
}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark")
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(func=_runner(module))
        _add_arguments(module, p)


def _add_arguments(module: str, parser: argparse.ArgumentParser) -> None:
    # The benchmark module defines its own flags; it must import quickly.
    importlib.import_module(module).add_arguments(parser)


def _runner(module: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        return int(importlib.import_module(module).run(args) or 0)

    return run
