"""``tokenmill sim run | validate | search``: the digital twin from the command line.

``run`` simulates a workload on a deployment (one replica, a routed cluster,
or prefill/decode pools) and writes JSON and a PNG; ``validate`` runs the
same workload on the real engine and in the twin and prints the twin's
errors; ``search`` finds the prefill:decode split and replica count with the
best goodput per GPU under SLOs. Everything heavy is imported inside the
command functions so that ``tokenmill --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tokenmill.commands.options import MiB, UsageError, check_policy, key_value, size_in


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("sim", help="simulate serving in virtual time with the engine's own scheduler")
    sub = parser.add_subparsers(dest="sim_command", required=True, metavar="SUBCOMMAND")

    run = sub.add_parser("run", help="simulate a workload on a deployment",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    _deployment_args(run)
    _cluster_args(run)
    _workload_args(run)
    _slo_args(run)
    out = run.add_argument_group("output")
    out.add_argument("--output", "-o", default="sim-results.json", help="JSON results")
    out.add_argument("--plot", help="PNG with latency CDFs, throughput, KV usage and queue depth over time")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--trace-file", help="request timelines as Chrome trace JSON (Perfetto), one process per replica")
    out.add_argument("--trace-max-requests", type=int, default=10000, help="requests per replica a --trace-file records")
    run.set_defaults(func=_run)

    cmp = sub.add_parser("compare", help="draw the engine's and the twin's request timelines side by side",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    cmp.add_argument("engine_trace", help="the engine's timeline (serve/generate --trace-file, sim validate --trace-dir)")
    cmp.add_argument("twin_trace", help="the twin's timeline of the same workload (sim run/validate)")
    cmp.add_argument("--plot", "-o", default="sim-compare.png", help="PNG with both timelines")
    cmp.add_argument("--rel-tol", type=float, default=0.25, help="relative TTFT/latency gap that counts as divergence")
    cmp.add_argument("--abs-tol", type=float, default=0.005, help="seconds of TTFT/latency gap always tolerated")
    cmp.add_argument("--max-requests", type=int, default=150, help="requests drawn (the first by arrival)")
    cmp.add_argument("--output", help="JSON report of the divergence")
    cmp.set_defaults(func=_compare)

    val = sub.add_parser("validate", help="run a workload on the real engine and in the twin; report the errors",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    val.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    val.add_argument("--profile", help="profile table to use (default: profile the model now)")
    val.add_argument("--grid", default="quick", choices=["quick", "full"], help="profile grid when profiling now")
    val.add_argument("--repeats", type=int, default=3, help="timed runs per grid point when profiling now")
    val.add_argument("--num-requests", type=int, default=60)
    val.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second")
    val.add_argument("--prompt-len", default="lognormal:96,0.5")
    val.add_argument("--output-len", default="lognormal:48,0.5")
    val.add_argument("--kv-cache-memory", type=size_in(MiB), default="256",
                     help="KV cache for the engine: MiB, or a size such as 1GiB")  # fmt: skip
    val.add_argument("--max-num-seqs", type=int, default=32)
    val.add_argument("--max-num-batched-tokens", type=int, default=512)
    val.add_argument("--max-decode-steps", type=int, default=8)
    val.add_argument("--dtype", default="float32")
    val.add_argument("--threads", type=int, default=1, help="torch threads for the profile and the real run")
    val.add_argument("--seed", type=int, default=0)
    val.add_argument("--replicas", type=int, default=1,
                     help="run the real side as a local Ray cluster of this many replicas (--threads each)")
    val.add_argument("--pd", metavar="P:D", help="real side: P prefill and D decode replicas")
    val.add_argument("--router", default="round_robin",
                     help="replica choice (of prefill replicas with --pd): round_robin, least_outstanding_tokens, "
                          "prefix_aware")  # fmt: skip
    val.add_argument("--output", "-o", help="JSON report")
    _validation_args(val)
    val.set_defaults(func=_validate)

    se = sub.add_parser("search", help="best prefill:decode split and replica count for goodput per GPU",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    _deployment_args(se)
    g = se.add_argument_group("search")
    g.add_argument("--slo-ttft", type=float, default=2.0, help="seconds to first token")
    g.add_argument("--slo-tpot", type=float, default=0.1, help="seconds per output token")
    g.add_argument("--attainment", type=float, default=0.9, help="fraction of requests that must meet both SLOs")
    g.add_argument("--max-replicas", type=int, default=8, help="replicas per candidate, prefill and decode together")
    g.add_argument("--num-requests", type=int, default=1000, help="requests per trial, at least")
    g.add_argument("--duration", type=float, default=60.0,
                   help="seconds of arrivals per trial, at least: candidates are judged at a sustained rate")
    g.add_argument("--warmup", type=float, default=0.2, help="fraction of a trial's arrivals not counted")
    g.add_argument("--tail", type=float, default=0.25,
                   help="final fraction of a trial's arrivals that must meet the target on its own")
    g.add_argument("--confirm", type=float, default=3.0,
                   help="each candidate's best rate is confirmed on a run this many times longer")
    g.add_argument("--prompt-len", default="azure", help="length distribution (see `sim run --help`)")
    g.add_argument("--output-len", default="azure")
    g.add_argument("--router", default="least_outstanding_tokens")
    g.add_argument("--prefill-tp", type=int, help="tensor parallelism of prefill replicas (default: --tp)")
    g.add_argument("--kv-link-gbps", type=float, default=400.0, help="prefill-to-decode link, Gbit/s per GPU")
    g.add_argument("--no-colocated", action="store_true", help="only disaggregated candidates")
    g.add_argument("--no-disagg", action="store_true", help="only colocated candidates")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output", "-o", help="JSON report")
    se.set_defaults(func=_search)


def _deployment_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("deployment")
    g.add_argument("--model", default="llama-3-8b",
                   help="built-in shape (llama-2-7b/13b/70b, llama-3-8b/70b, mistral-7b, qwen2-7b, smollm-135m), "
                        "a config.json, or a checkpoint directory")  # fmt: skip
    g.add_argument("--hardware", default="h100", help="h100, h200, a100, l40s, or cpu (measured)")
    g.add_argument("--tp", type=int, default=1, help="tensor parallelism per replica")
    g.add_argument("--dtype", default="bf16", help="weights and compute: fp32, bf16, fp16, fp8")
    g.add_argument("--kv-dtype", "--kv-cache-dtype", dest="kv_dtype",
                   help="KV cache dtype: bf16, fp8, int8, int4 (tokenmill's, scales included) ... (default: --dtype)")
    g.add_argument("--cost-model", default="roofline", choices=["roofline", "profiled"])
    g.add_argument("--profile", help="profile table from `tokenmill profile` (profiled model; CPU peaks for cpu)")
    g.add_argument("--step-overhead", type=float, help="seconds per step outside the kernels (roofline)")
    g.add_argument("--flops-efficiency", type=float, help="achieved fraction of peak FLOP/s (roofline)")
    g.add_argument("--bandwidth-efficiency", type=float, help="achieved fraction of peak bandwidth (roofline)")
    s = p.add_argument_group("scheduler (per replica)")
    s.add_argument("--block-size", type=int, default=16)
    s.add_argument("--num-blocks", type=int, help="KV blocks per replica (default: what fits in memory)")
    s.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    s.add_argument("--kv-cache-memory", type=size_in(MiB), default="1024",
                   help="KV cache per replica with the profiled cost model (the real engine's setting): MiB, "
                        "or a size such as 4GiB")  # fmt: skip
    s.add_argument("--max-num-seqs", type=int, default=256)
    s.add_argument("--max-num-batched-tokens", type=int, default=8192)
    s.add_argument("--max-model-len", type=int)
    s.add_argument("--no-prefix-caching", action="store_true")
    s.add_argument("--no-chunked-prefill", action="store_true")
    s.add_argument("--max-decode-steps", type=int, default=1024,
                   help="decode steps one plan may cover (ideal mode: a simulation shortcut; engine mode: the "
                        "engine's setting)")  # fmt: skip
    s.add_argument("--speculative-tokens", default="0", metavar="K|auto",
                   help="speculative decoding: draft tokens per step (K fixed, auto: adaptive up to 8; "
                        "default 0: off)")  # fmt: skip
    s.add_argument("--spec-acceptance", type=float, default=0.7,
                   help="chance that a draft token is accepted (a property of workload and proposer)")
    s.add_argument("--draft-cost", type=float, default=0.05,
                   help="one draft step's time over one target decode step (0 for n-gram lookup)")
    s.add_argument("--spec-knee-tokens", type=int,
                   help="tokens per step past which a step is compute bound (default: from the cost model)")
    s.add_argument("--max-loras", type=int, default=None,
                   help="LoRA adapters running at once per replica (requests name theirs in a trace's 'lora')")
    s.add_argument("--lora-rank", type=int, default=16, help="the adapters' rank, for the roofline cost model")
    s.add_argument("--policy", default="fcfs", help="scheduling policy")
    s.add_argument("--policy-option", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="policy option (value parsed as JSON when it can be)")  # fmt: skip


def _cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--replicas", type=int, default=1, help="colocated replicas")
    g.add_argument("--router", default="round_robin",
                   help="round_robin, least_outstanding_tokens or prefix_aware")  # fmt: skip
    g.add_argument("--disagg", metavar="P:D", help="prefill:decode replicas (disaggregated serving)")
    g.add_argument("--prefill-tp", type=int, help="tensor parallelism of prefill replicas (default: --tp)")
    g.add_argument("--kv-link-gbps", type=float, default=400.0, help="prefill-to-decode link, Gbit/s per GPU")
    g.add_argument("--kv-link-latency-ms", type=float, default=1.0)
    g.add_argument("--mode", default="ideal", choices=["ideal", "engine"],
                   help="ideal: admit at the next step boundary; engine: plans run to their end "
                        "(an engine with --max-decode-steps)")  # fmt: skip


def _workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", default="synthetic", choices=["synthetic", "azure", "jsonl", "mix"])
    g.add_argument("--num-requests", type=int,
                   help="requests (default: 1000 synthetic; the whole trace when replaying one)")  # fmt: skip
    g.add_argument("--rate", type=float, default=1.0, help="arrivals per second (synthetic; azure resampling)")
    g.add_argument("--arrival",
                   help="poisson (synthetic default), gamma, constant; trace (azure/jsonl default: replay "
                        "timestamps); azure also takes poisson/gamma to resample lengths at --rate")  # fmt: skip
    g.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of gamma gaps")
    g.add_argument("--prompt-len", default="lognormal:1000,0.8",
                   help="fixed:N, uniform:A,B, lognormal:MEAN,SIGMA, normal:MEAN,STD, exp:MEAN or azure")  # fmt: skip
    g.add_argument("--output-len", default="lognormal:200,0.8")
    g.add_argument("--shared-prefix", metavar="GROUPS:LEN", help="shared system prompts")
    g.add_argument("--trace", help="Azure CSV (default: the bundled conversation trace) or JSONL trace")
    g.add_argument("--mix", help="multi-tenant mix (JSON; see tokenmill.sim.workload.from_mix)")
    g.add_argument("--time-scale", type=float, default=1.0, help="stretch trace timestamps (0.5: twice as fast)")
    g.add_argument("--start", type=float, default=0.0, help="seconds into the Azure trace to start from")
    g.add_argument("--slo-class", default="", help="interactive, standard or batch for requests without SLOs")
    g.add_argument("--seed", type=int, default=0)


def _slo_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SLOs (override the requests' own)")
    g.add_argument("--slo-ttft", type=float, help="seconds to first token")
    g.add_argument("--slo-tpot", type=float, help="seconds per output token")


def _deployment(args: argparse.Namespace, tp: int | None = None) -> Any:
    from tokenmill.sim.build import DeploymentSpec

    check_policy(args.policy, dict(args.policy_option))
    k, adaptive = _speculative_tokens(args.speculative_tokens)
    if not 0.0 <= args.spec_acceptance <= 1.0:
        raise SystemExit(f"--spec-acceptance must be in [0, 1], got {args.spec_acceptance}")

    return DeploymentSpec(
        model=args.model, hardware=args.hardware, tp=tp or args.tp, dtype=args.dtype, kv_dtype=args.kv_dtype,
        cost_model=args.cost_model, profile=args.profile, step_overhead=args.step_overhead,
        flops_efficiency=args.flops_efficiency, bandwidth_efficiency=args.bandwidth_efficiency,
        block_size=args.block_size, num_blocks=args.num_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching,
        enable_chunked_prefill=not args.no_chunked_prefill, max_decode_steps=args.max_decode_steps,
        policy=args.policy, policy_options=dict(args.policy_option),
        num_speculative_tokens=k, speculative_adaptive=adaptive, draft_cost=args.draft_cost,
        spec_knee_tokens=args.spec_knee_tokens,
        max_loras=args.max_loras, lora_rank=args.lora_rank,
    )  # fmt: skip


def _speculative_tokens(text: str) -> tuple[int, bool]:
    """``--speculative-tokens``: (most drafts per step, adaptive); 0 is off."""
    from tokenmill.spec import AUTO_MAX_TOKENS

    if text == "auto":
        return AUTO_MAX_TOKENS, True
    try:
        k = int(text)
    except ValueError:
        raise SystemExit(f"--speculative-tokens takes K, auto or 0, got {text!r}") from None
    if k < 0:
        raise SystemExit(f"--speculative-tokens must be >= 0, got {k}")
    return k, False


def build_run(args: argparse.Namespace) -> tuple[Any, Any]:
    """(workload, SimConfig) from ``sim run`` arguments."""
    from tokenmill.sim.build import (
        WorkloadSpec,
        kv_bytes_per_token,
        make_cost_model,
        make_scheduler_config,
        make_workload,
    )
    from tokenmill.sim.config import PoolConfig, SimConfig

    spec = _deployment(args)
    cm, shape, engine = make_cost_model(spec)
    sched = make_scheduler_config(spec, cm, shape, engine)
    replicas = args.replicas
    prefill_pool = None
    if args.disagg:
        try:
            p, d = (int(x) for x in args.disagg.split(":"))
        except ValueError:
            raise SystemExit(f"--disagg takes P:D replica counts, got {args.disagg!r}") from None
        replicas = d
        pspec = _deployment(args, tp=args.prefill_tp)
        pcm, pshape, pengine = make_cost_model(pspec)
        prefill_pool = PoolConfig(make_scheduler_config(pspec, pcm, pshape, pengine), pcm, p, router=args.router,
                                  gpus_per_replica=pspec.tp)  # fmt: skip
    router = args.router if not args.disagg else "least_outstanding_tokens"
    pool = PoolConfig(sched, cm, replicas, router=router, gpus_per_replica=spec.tp,
                      spec_acceptance=args.spec_acceptance)  # fmt: skip
    groups, plen = 0, 0
    if args.shared_prefix:
        groups, plen = (int(x) for x in args.shared_prefix.split(":"))
    kind = args.workload
    path = args.trace if kind in ("azure", "jsonl") else args.mix
    arrival = args.arrival or ("trace" if kind in ("azure", "jsonl") else "poisson")
    num = args.num_requests
    if num is None:
        num = 0 if arrival == "trace" else 1000
    ws = WorkloadSpec(kind=kind, num_requests=num, rate=args.rate, arrival=arrival, cv=args.cv,
                      prompt_len=args.prompt_len, output_len=args.output_len, shared_prefix_groups=groups,
                      shared_prefix_len=plen, path=path, time_scale=args.time_scale, start=args.start,
                      slo_class=args.slo_class, seed=args.seed)  # fmt: skip
    vocab = shape.vocab_size if shape else 32000
    wl = make_workload(ws, vocab, sched.max_model_len)
    cfg = SimConfig(pool, prefill_pool=prefill_pool, mode=args.mode, ttft_slo=args.slo_ttft, tpot_slo=args.slo_tpot,
                    kv_transfer_bandwidth=args.kv_link_gbps * 1e9 / 8 * (args.prefill_tp or args.tp),
                    kv_transfer_latency=args.kv_link_latency_ms / 1000,
                    kv_bytes_per_token=kv_bytes_per_token(spec, shape))  # fmt: skip
    return wl, cfg


def _run(args: argparse.Namespace) -> int:
    from tokenmill.sim.report import plot, print_summary, write_json
    from tokenmill.sim.simulator import Simulator

    try:
        wl, cfg = build_run(args)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not len(wl):
        print("error: the workload has no requests", file=sys.stderr)
        return 2
    if args.trace_file:
        cfg.timeline_requests = args.trace_max_requests
    if args.no_progress:
        sim = Simulator(wl, cfg)
        result = sim.run()
    else:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        total = len(wl)
        every = max(1, total // 200)
        with Progress(TextColumn("simulating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      transient=True) as bar:  # fmt: skip
            task = bar.add_task("sim", total=total)

            def progress(done: int, rejected: int) -> None:
                if done % every == 0:
                    bar.update(task, completed=done + rejected)

            result = Simulator(wl, cfg, progress).run()
    print_summary(result)
    extra = {"command": " ".join(["tokenmill", "sim", "run", *sys.argv[3:]]) if len(sys.argv) > 2 else None}
    write_json(result, args.output, extra)
    print(f"results: {args.output}")
    if args.plot:
        plot(result, args.plot, title=f"tokenmill sim: {args.model} on {args.hardware} (tp={args.tp})")
        print(f"plot: {args.plot}")
    if args.trace_file:
        from tokenmill.sim.trace_file import write_trace

        n = write_trace(args.trace_file, result.timelines, {"command": extra["command"]}, origin=0.0)
        print(f"timeline: {args.trace_file} ({n} events)")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from tokenmill.sim.compare import describe, divergence, plot_compare
    from tokenmill.sim.trace_file import read_trace

    try:
        engine, twin = read_trace(args.engine_trace), read_trace(args.twin_trace)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: cannot read the traces: {e}", file=sys.stderr)
        return 2
    report = divergence(engine, twin, rel_tol=args.rel_tol, abs_tol=args.abs_tol)
    for line in describe(report):
        print(line)
    plot_compare(engine, twin, args.plot, report, max_requests=args.max_requests)
    print(f"plot: {args.plot}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
        print(f"report: {args.output}")
    return 0


def _validation_args(val: argparse.ArgumentParser) -> None:
    """``sim validate``'s held-out workloads, repeats, jitter, pinning and timelines."""
    g = val.add_argument_group("held-out workload (default: synthetic Poisson with the lengths above)")
    g.add_argument("--arrival", default="poisson", choices=["poisson", "gamma", "constant"],
                   help="synthetic arrivals; gamma with --cv > 1 gives bursts")  # fmt: skip
    g.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of gamma gaps (burstiness)")
    g.add_argument("--shared-prefix", metavar="GROUPS:LEN", help="requests share one of GROUPS system prompts")
    g.add_argument("--trace", help="CSV with TIMESTAMP, ContextTokens, GeneratedTokens (the Azure trace format); "
                                   "replays its arrivals for --num-requests requests")  # fmt: skip
    g.add_argument("--time-scale", type=float, default=1.0, help="stretch trace timestamps (0.5: twice the load)")
    g.add_argument("--start", type=float, default=0.0, help="seconds into the trace to start from")
    g.add_argument("--length-scale", type=float, default=1.0, help="multiply prompt and output lengths (fit a trace "
                                                                   "to a small model)")  # fmt: skip
    r = val.add_argument_group("repeats and noise")
    r.add_argument("--real-runs", type=int, default=3, help="real engine runs (the engine's own spread)")
    r.add_argument("--twin-runs", type=int, default=5, help="twin runs with jittered step times (seeds)")
    r.add_argument("--no-jitter", action="store_true", help="twin with the profile's median step times only")
    r.add_argument("--cpus", help="pin the process to these CPUs (e.g. 0 or 0-1) for the profile and real runs")
    val.add_argument("--trace-dir", help="write the engine's and the twin's request timelines (Chrome trace JSON) "
                                        "and their side-by-side plot here")  # fmt: skip


def _validation_workload(args: argparse.Namespace) -> Any:
    from tokenmill.sim.build import WorkloadSpec

    groups, plen = 0, 0
    if args.shared_prefix:
        try:
            groups, plen = (int(x) for x in args.shared_prefix.split(":"))
        except ValueError:
            raise UsageError(f"--shared-prefix takes GROUPS:LEN, got {args.shared_prefix!r}") from None
    if args.trace:
        return WorkloadSpec(kind="azure", num_requests=args.num_requests, arrival="trace", path=args.trace,
                            time_scale=args.time_scale, start=args.start, seed=args.seed)  # fmt: skip
    return WorkloadSpec(num_requests=args.num_requests, rate=args.rate, arrival=args.arrival, cv=args.cv,
                        prompt_len=args.prompt_len, output_len=args.output_len, shared_prefix_groups=groups,
                        shared_prefix_len=plen, seed=args.seed)  # fmt: skip


def _print_validation(console: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    n = len(report["real_runs"])
    table = Table(title=f"twin vs real ({n} runs): {report['model']} ({report.get('deployment', '1 replica')})")
    for col in ("metric", "real engine", "spread", "twin", "error", "within max(5%, spread)", "drift-corrected", "error "):
        table.add_column(col, justify="right")
    for key in ("ttft_mean_ms", "ttft_p90_ms", "ttft_p99_ms", "tpot_mean_ms", "tpot_p90_ms", "tpot_p99_ms",
                "output_throughput"):  # fmt: skip
        r, t, c = report["real"][key], report["twin"][key], report["twin_drift_corrected"][key]
        err, cerr = report["error_pct"].get(key), report["error_pct_drift_corrected"].get(key)
        spread = report["real_spread_pct"].get(key)
        ok = report["within_target"].get(key)
        table.add_row(key, f"{r:.2f}", f"{spread:.1f}%" if spread is not None else "-", f"{t:.2f}",
                      f"{err:+.1f}%" if err is not None else "-", "" if ok is None else ("yes" if ok else "no"),
                      f"{c:.2f}", f"{cerr:+.1f}%" if cerr is not None else "-")  # fmt: skip
    console.print(table)
    pr = report["probe_ms"]
    during = [x for pair in pr["real_runs"] for x in pair]
    console.print(f"reference step: {pr['profile']:.2f} ms in the profile, {min(during):.2f}-{max(during):.2f} ms "
                  f"around the real runs (machine drift {report['machine_drift_pct']:+.1f}%); the drift-corrected "
                  f"twin's costs are scaled by {report['drift_factor']:.2f}, the real plans' measured/priced time")  # fmt: skip
    for i, c in enumerate(report.get("step_time_check", [])):
        if c:
            console.print(f"run {i + 1}: {c['plans']} plans took {c['measured_over_priced']:.2f}x the profile's price "
                          f"(per plan p10/p50/p90 {c['ratio_p10']:.2f}/{c['ratio_p50']:.2f}/{c['ratio_p90']:.2f})")  # fmt: skip
    if "timelines" in report:
        from tokenmill.sim.compare import describe

        for line in describe(report["timelines"]["divergence"]):
            console.print(line, markup=False)
        console.print(f"timelines: {report['timelines']['plot']}")


def _validate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tokenmill.sim.pinning import parse_cpus
    from tokenmill.sim.validate import validate

    console = Console()
    pd = None
    if args.pd:
        from tokenmill.cluster.launch import parse_pd

        try:
            pd = parse_pd(args.pd)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.replicas < 1:
        print(f"error: --replicas must be >= 1, got {args.replicas}", file=sys.stderr)
        return 2
    try:
        ws = _validation_workload(args)
        cpus = parse_cpus(args.cpus) if args.cpus else None
        report = validate(model=args.model, profile=args.profile, kv_cache_memory=args.kv_cache_memory,
                          max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                          max_decode_steps=args.max_decode_steps, dtype=args.dtype, threads=args.threads,
                          grid=args.grid, repeats=args.repeats, log=console.print, real_runs=args.real_runs,
                          twin_runs=args.twin_runs, jitter=not args.no_jitter, workload=ws,
                          length_scale=args.length_scale, cpus=cpus, trace_dir=args.trace_dir,
                          replicas=args.replicas, pd=pd, router=args.router)  # fmt: skip
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_validation(console, report)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
        console.print(f"report: {args.output}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from tokenmill.sim.search import SearchSpec, search

    try:
        deployment = _deployment(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spec = SearchSpec(
        deployment=deployment,
        prefill_deployment=_deployment(args, tp=args.prefill_tp) if args.prefill_tp else None,
        ttft_slo=args.slo_ttft, tpot_slo=args.slo_tpot, attainment=args.attainment,
        max_replicas=args.max_replicas, colocated=not args.no_colocated, disaggregated=not args.no_disagg,
        num_requests=args.num_requests, duration=args.duration, warmup=args.warmup, tail=args.tail,
        confirm=args.confirm, prompt_len=args.prompt_len, output_len=args.output_len,
        router=args.router, kv_transfer_bandwidth=args.kv_link_gbps * 1e9 / 8 * (args.prefill_tp or args.tp),
        seed=args.seed,
    )  # fmt: skip
    report = search(spec, log=print)
    b = report["best"]
    kind = f"{b['prefill']} prefill : {b['decode']} decode" if b["prefill"] else f"{b['decode']} colocated"
    print(f"best: {kind} replicas, {b['max_rate']:.2f} req/s within SLO on {b.get('gpus')} GPUs "
          f"= {b.get('goodput_per_gpu', 0.0):.3f} req/s per GPU")  # fmt: skip
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
        print(f"report: {args.output}")
    return 0
