"""``tokenmill bench serve``: open-loop load against any OpenAI-compatible server.

Requests arrive as a Poisson process (``--burstiness 1``) or a gamma process
at ``--request-rate`` requests/s, or all at once with ``--max-concurrency``
capping how many are in flight; each streams its answer. The run reports
TTFT, TPOT, ITL and E2E latency (mean, p50, p90, p99), request and token
throughput, and goodput under ``--goodput`` SLOs; ``--result-file`` writes
it all as JSON and ``--plot DIR`` draws latency CDFs and throughput over time.

    tokenmill serve &
    tokenmill bench serve --base-url http://127.0.0.1:8000 --workload chat \\
        --num-prompts 200 --request-rate 8 --goodput ttft:500 tpot:50 --result-file out.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import random
import sys
from pathlib import Path
from typing import Any

from tokenmill.bench.serve_workloads import WORKLOADS  # stdlib only: --help stays fast


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="the server, with or without /v1 (default http://127.0.0.1:8000)")
    g.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                   help="/v1/completions or /v1/chat/completions")
    g.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer token (default $OPENAI_API_KEY)")
    g.add_argument("--tokenizer", default=None,
                   help="HF tokenizer directory for exact prompt lengths (default: the model's, if the server "
                        "names a local directory; else random words)")
    w = parser.add_argument_group("workload")
    w.add_argument("--workload", choices=WORKLOADS, default="fixed")
    w.add_argument("--num-prompts", type=int, default=100)
    w.add_argument("--input-len", type=int, default=128, help="prompt tokens (median for 'chat'; question for 'shared-prefix')")
    w.add_argument("--output-len", type=int, default=128, help="answer tokens (median for 'chat')")
    w.add_argument("--length-sigma", type=float, default=0.8, help="lognormal sigma of the 'chat' lengths")
    w.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: distinct system prompts")
    w.add_argument("--questions-per-prefix", type=int, default=25, help="shared-prefix: questions per system prompt")
    w.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: system prompt tokens")
    w.add_argument("--trace", default=None, help="azure: the trace CSV (default: the Azure 2023 conversation trace in data/traces/)")
    w.add_argument("--trace-timestamps", action="store_true", help="azure: replay the trace's arrival times")
    w.add_argument("--trace-speedup", type=float, default=1.0, help="azure: divide trace inter-arrival times by this")
    w.add_argument("--trace-sample", action="store_true", help="azure: start at a random row (seeded) instead of the first")
    w.add_argument("--seed", type=int, default=0)
    lg = parser.add_argument_group("load")
    lg.add_argument("--request-rate", type=float, default=math.inf,
                    help="requests/s of the arrival process (default inf: all at once)")
    lg.add_argument("--burstiness", type=float, default=1.0,
                    help="gamma shape of inter-arrival times: 1 = Poisson, <1 burstier, >1 more regular")
    lg.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    lg.add_argument("--temperature", type=float, default=0.0)
    lg.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                    help="do not send ignore_eos (a tokenmill/vLLM extra) so answers may end early")
    lg.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    o = parser.add_argument_group("output")
    o.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 (names: ttft, tpot, itl, e2e; milliseconds)")
    o.add_argument("--result-file", default=None, help="write the results as JSON here")
    o.add_argument("--plot", default=None, metavar="DIR", help="write latency_cdf.png and throughput.png here")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def _api_base(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _discover(base: str, api_key: str | None) -> dict[str, Any] | None:
    """The first model card of ``/v1/models`` (None if the server does not list models)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(f"{base}/models", headers=headers, timeout=30.0)
        resp.raise_for_status()
        data = resp.json().get("data") or []
    except (httpx.HTTPError, ValueError):
        return None
    return data[0] if data else None


def _load_tokenizer(path: str | None) -> Any:
    if not path or not Path(path).is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - fall back to word prompts
        return None


def run(args: argparse.Namespace) -> int:
    import asyncio

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tokenmill.bench.serve_client import ClientConfig, run_load
    from tokenmill.bench.serve_report import build_report, parse_slos, print_report, write_plots
    from tokenmill.bench.serve_workloads import arrival_times, make_workload

    console = Console(stderr=True)
    try:
        slos = parse_slos(args.goodput)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    if args.num_prompts < 1 or args.burstiness <= 0 or (args.max_concurrency is not None and args.max_concurrency < 1):
        console.print("[red]error:[/red] --num-prompts and --max-concurrency must be >= 1, --burstiness > 0")
        return 2
    base = _api_base(args.base_url)
    card = _discover(base, args.api_key)
    model = args.model or (card or {}).get("id")
    if model is None:
        console.print(f"[red]error:[/red] {base}/models lists no model; pass --model")
        return 2
    tokenizer = _load_tokenizer(args.tokenizer or (card or {}).get("root"))
    max_model_len = (card or {}).get("max_model_len")
    try:
        requests = make_workload(args, tokenizer, max_model_len)
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    rng = random.Random(args.seed + 1)
    if all(r.arrival is not None for r in requests):
        send_times = [float(r.arrival) for r in requests]  # type: ignore[arg-type]
    else:
        send_times = arrival_times(len(requests), args.request_rate, args.burstiness, rng)
    cfg = ClientConfig(
        base_url=base,
        model=model,
        endpoint=args.endpoint,
        api_key=args.api_key,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        timeout_s=args.timeout,
    )
    console.print(
        f"{len(requests)} '{args.workload}' requests to {base} ({model}), rate {args.request_rate} req/s, "
        f"burstiness {args.burstiness}, max concurrency {args.max_concurrency or 'none'}"
        + ("" if tokenizer is not None else " [dim](no tokenizer: word prompts)[/dim]")
    )
    progress = Progress(
        TextColumn("[bold]requests"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, disable=args.no_progress, transient=False,
    )
    with progress:
        task = progress.add_task("requests", total=len(requests))
        results, duration = asyncio.run(
            run_load(cfg, requests, send_times, args.max_concurrency, lambda _r: progress.advance(task))
        )
    meta = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "base_url": base,
        "endpoint": args.endpoint,
        "model": model,
        "workload": {
            "name": args.workload,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "seed": args.seed,
            **({"num_prefixes": args.num_prefixes, "questions_per_prefix": args.questions_per_prefix,
                "prefix_len": args.prefix_len} if args.workload == "shared-prefix" else {}),
            **({"trace": args.trace, "trace_timestamps": args.trace_timestamps} if args.workload == "azure" else {}),
        },
        "request_rate": None if math.isinf(args.request_rate) else args.request_rate,
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "temperature": args.temperature,
        "ignore_eos": args.ignore_eos,
        "exact_prompt_lengths": tokenizer is not None,
    }
    report = build_report(results, duration, slos, meta)
    print_report(report, Console())
    if args.result_file:
        Path(args.result_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result_file).write_text(json.dumps(report, indent=2))
        console.print(f"wrote {args.result_file}")
    if args.plot:
        for path in write_plots(results, duration, Path(args.plot)):
            console.print(f"wrote {path}")
    return 0 if report["completed"] else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tokenmill.bench.serve")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
