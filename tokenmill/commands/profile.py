"""``tokenmill profile``: time the real executor on a grid of step shapes for the twin's profiled cost model.

Writes a JSON table (``tokenmill-profile/1``) with the executor's step time
over (prefill tokens, decode sequences, context tokens), the engine's
overhead outside the executor, and this CPU's measured matmul FLOP/s and
memory bandwidth (the roofline model's ``cpu`` hardware). Use it with
``tokenmill sim run --cost-model profiled --profile PATH``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tokenmill.commands.options import MiB, size_in


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("profile", help="measure the engine's step times for the simulator's cost model",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    p.add_argument("--output", "-o", help="JSON table (default: profile-<model>.json)")
    p.add_argument("--grid", default="quick", choices=["quick", "full"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="largest prefill measured")
    p.add_argument("--max-num-seqs", type=int, default=64, help="largest decode batch measured")
    p.add_argument("--kv-cache-memory", type=size_in(MiB), default="512",
                   help="KV cache for the measurements: MiB, or a size such as 1GiB")  # fmt: skip
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--statistic", default="robust", choices=["mean", "median", "robust"],
                   help="per grid point: robust is the median with outliers (> 3 MADs) dropped")
    p.add_argument("--jitter-samples", type=int, default=200,
                   help="repeats of one fixed step whose spread the twin draws from (0: skip)")
    p.add_argument("--multistep", type=int, default=8,
                   help="also time decode plans of this many sub-steps (the engine's max_decode_steps; 1: skip)")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--no-overhead", action="store_true", help="skip measuring the engine's per-step overhead")
    p.add_argument("--hardware-only", action="store_true",
                   help="only measure this CPU's FLOP/s and bandwidth (for --hardware cpu)")  # fmt: skip
    p.set_defaults(func=_profile)


def _profile(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.hardware_only:
        from tokenmill.sim.hardware import DEFAULT_CPU_PROFILE, measure_cpu

        hw = measure_cpu().to_dict()
        out = Path(args.output) if args.output else DEFAULT_CPU_PROFILE
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(hw, indent=1))
        console.print(f"cpu: fp32 {hw['peak_flops']['fp32'] / 1e9:.1f} GFLOP/s, bf16 {hw['peak_flops']['bf16'] / 1e9:.1f} "
                      f"GFLOP/s, {hw['mem_bandwidth'] / 1e9:.1f} GB/s -> {out}")  # fmt: skip
        return 0
    from tokenmill.engine import resolve_model_path
    from tokenmill.sim.profiler import profile_model

    path = resolve_model_path(args.model)
    with Progress(TextColumn("profiling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:  # fmt: skip
        task = bar.add_task("grid", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        table = profile_model(path, grid=args.grid, dtype=args.dtype, block_size=args.block_size,
                              max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                              kv_cache_memory=args.kv_cache_memory, repeats=args.repeats,
                              stat=args.statistic, multistep=args.multistep, measure_overhead=not args.no_overhead,
                              progress=progress, jitter_samples=args.jitter_samples)  # fmt: skip
    for note in table["clamped"]:
        console.print(f"note: {note}", markup=False)
    out = Path(args.output or f"profile-{Path(path).name}.json")
    out.write_text(json.dumps(table, indent=1))
    over = table["engine_overhead"]
    console.print(f"{len(table['axes']['prefill_tokens']) * len(table['axes']['decode_seqs']) * len(table['axes']['context_tokens'])}"
                  f" grid points in {table['grid_seconds']:.0f} s; engine overhead {over['per_step_s'] * 1e3:.2f} ms/step "
                  f"+ {over.get('per_token_s', 0.0) * 1e3:.3f} ms/token -> {out}")  # fmt: skip
    return 0
