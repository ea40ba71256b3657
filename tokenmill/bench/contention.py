"""``tokenmill bench contention``: batch-1 decode on a quiet machine and beside busy processes.

For each model and dtype the model is loaded once; then, per repeat and per
thread mode, one quiet run and one busy run (``--busy`` processes spinning in
a ``while True: pass`` loop, pinned to no core, started just before the run and killed
just after it) follow each other, in alternating order, so every busy/quiet
ratio compares runs a few seconds apart. A run is one prompt of
``--prompt-len`` random tokens and ``--output-len`` greedy tokens through
``LLM.generate`` (prefill included), timed after ``--settle`` seconds of the
same runs in the same condition, so that the figures are steady state (the
controller's reaction time is in its docstring). Thread modes:

- ``adaptive``: tokenmill's thread controller (``tokenmill/model/threads.py``), the default;
- ``fixed``: all of torch's threads, always (tokenmill without the controller);
- ``single``: one thread.

Prints each cell's median tokens/s, the quiet/busy ratio of the medians and the
median of each repeat's own quiet/busy ratio ("pairs"), the load average
before and after each model, and (Linux) the cores' worth of CPU that other
processes used during the runs: ~0 in a quiet run on an idle machine, ~1 per
busy process in a busy run; more says the machine was not idle.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODES = ("adaptive", "fixed", "single")
# ``while True: pass`` that ends with the benchmark, even one killed before it could clean up
# (run as ``python -c BUSY_LOOP <parent pid>``)
BUSY_LOOP = """
import os, sys
parent = int(sys.argv[1])
while os.getppid() == parent:
    for _ in range(1_000_000):
        pass
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models",
        default="default,smollm-135m",
        help="comma list: 'default' (the bundled model), a synthetic shape "
        "(tokenmill.bench.synthetic_model), or a checkpoint directory",
    )
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--busy", type=int, default=1, help="busy processes beside the busy runs")
    p.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="seconds of untimed runs before each timed one, in the same condition (0: time "
        "the controller's reaction too)",
    )
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-file", default=None, help="write all figures as JSON here")


def _model_dir(name: str) -> str | None:
    from tokenmill.bench.synthetic_model import SHAPES, make_model
    from tokenmill.bench.throughput import DEFAULT_CACHE

    if name == "default":
        return None
    if name in SHAPES:
        return str(make_model(DEFAULT_CACHE / "bench" / name, name))
    return name


def _set_mode(mode: str) -> None:
    from tokenmill.model import kernels, threads

    ctl = threads.controller()
    if mode == "adaptive":
        if not isinstance(ctl, threads.ThreadController):
            raise RuntimeError("the thread controller is off here (no CPU kernels, no /proc, "
                               f"or {threads.ENV_SWITCH}=0)")  # fmt: skip
        ctl.reset()
        ctl.enabled = True
        return
    ctl.enabled = False
    kernels.set_thread_limit(1 if mode == "single" else 0)


class Busy:
    """``n`` processes that spin on a CPU each, for the length of a ``with`` block."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Busy:
        cmd = [sys.executable, "-c", BUSY_LOOP, str(os.getpid())]
        self.procs = [subprocess.Popen(cmd) for _ in range(self.n)]
        if self.procs:
            time.sleep(0.2)  # interpreter start-up: spinning by the time the run starts
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def _busy_ticks() -> tuple[int, int] | None:
    """(non-idle, all) clock ticks of every CPU so far, from /proc/stat (None elsewhere)."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def settle(llm: Any, prompt: list[int], output_len: int, seconds: float) -> None:
    """Untimed runs for ``seconds``: the thread controller settles in the new condition."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        measure(llm, prompt, output_len)


def measure(llm: Any, prompt: list[int], output_len: int) -> tuple[float, float | None]:
    """Output tokens/s of one greedy generation (prefill included), and the cores' worth of
    CPU that other processes used meanwhile (the busy processes of a busy run included)."""
    from tokenmill.core.request import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    ticks0, cpu0 = _busy_ticks(), time.process_time()
    start = time.perf_counter()
    out = llm.generate([prompt], params)
    seconds = time.perf_counter() - start
    ticks1, cpu1 = _busy_ticks(), time.process_time()
    n = len(out[0].outputs[0].token_ids)
    if n != output_len:
        raise RuntimeError(f"generated {n} tokens, expected {output_len}")
    others = None
    if ticks0 and ticks1 and ticks1[1] > ticks0[1]:
        cores = (os.cpu_count() or 1) * (ticks1[0] - ticks0[0]) / (ticks1[1] - ticks0[1])
        others = max(0.0, cores - (cpu1 - cpu0) / seconds)
    return n / seconds, others


def run_cell(llm: Any, prompt: list[int], args: argparse.Namespace, modes: list[str]) -> list[dict]:
    """All repeats of all modes for one loaded model: quiet and busy runs, interleaved."""
    from tokenmill.model import kernels, threads

    runs: dict[str, dict[str, list[float]]] = {m: {"quiet": [], "busy": []} for m in modes}
    others: dict[str, dict[str, list[float]]] = {m: {"quiet": [], "busy": []} for m in modes}
    end_threads: dict[str, dict[str, list[int]]] = {m: {"quiet": [], "busy": []} for m in modes}
    changes: dict[str, dict[str, list[int]]] = {m: {"quiet": [], "busy": []} for m in modes}
    ctl = threads.controller()
    for r in range(args.repeats):
        for mode in modes:
            _set_mode(mode)
            order = ("quiet", "busy") if r % 2 == 0 else ("busy", "quiet")
            for kind in order:
                with Busy(args.busy if kind == "busy" else 0):
                    settle(llm, prompt, args.output_len, args.settle)
                    changes_before = ctl.changes
                    tps, other = measure(llm, prompt, args.output_len)
                changes[mode][kind].append(ctl.changes - changes_before)
                runs[mode][kind].append(tps)
                if other is not None:
                    others[mode][kind].append(other)
                end_threads[mode][kind].append(kernels.kernel_threads())
    _set_mode("adaptive" if isinstance(threads.controller(), threads.ThreadController) else "fixed")
    rows = []
    for mode in modes:
        quiet = statistics.median(runs[mode]["quiet"])
        busy = statistics.median(runs[mode]["busy"])
        # each repeat's quiet and busy runs are seconds apart: their ratio drifts less with the
        # machine's other load than a ratio of medians taken minutes apart
        pairs = [q / b for q, b in zip(runs[mode]["quiet"], runs[mode]["busy"], strict=True)]
        rows.append({
            "mode": mode, "quiet": quiet, "busy": busy, "quiet_over_busy": quiet / busy,
            "pair_ratios": pairs, "pair_ratio_median": statistics.median(pairs),
            "quiet_runs": runs[mode]["quiet"], "busy_runs": runs[mode]["busy"],
            "others_cores": {k: statistics.median(v) if v else None for k, v in others[mode].items()},
            "threads_after": end_threads[mode],
            "thread_changes_while_timed": changes[mode],
        })  # fmt: skip
    return rows


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tokenmill.llm import LLM

    console = Console(width=None if sys.stdout.isatty() else 160)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    import torch

    console.print(
        f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}; batch 1, prompt "
        f"{args.prompt_len}, output {args.output_len}; {args.busy} busy process(es); "
        f"{args.repeats} repeats"
    )
    results: list[dict[str, Any]] = []
    rng = random.Random(args.seed)
    for name in [m for m in args.models.split(",") if m]:
        model_dir = _model_dir(name)
        for dtype in [d for d in args.dtypes.split(",") if d]:
            llm = LLM(model_dir, dtype=dtype, kv_cache_memory=256 << 20, max_num_seqs=1)
            vocab = llm.engine.executor.model_config.vocab_size
            prompt = [rng.randrange(1, vocab) for _ in range(args.prompt_len)]
            _set_mode("fixed")
            measure(llm, prompt[:8], 4)  # warm-up
            load_before = os.getloadavg()
            rows = run_cell(llm, prompt, args, modes)
            load_after = os.getloadavg()
            for row in rows:
                row |= {"model": name, "dtype": dtype, "load_before": load_before,
                        "load_after": load_after}  # fmt: skip
                results.append(row)
                console.print(
                    f"{name} {dtype} {row['mode']}: quiet {row['quiet']:.1f} tok/s, busy "
                    f"{row['busy']:.1f} tok/s, quiet/busy {row['quiet_over_busy']:.2f}x "
                    f"(pairs {row['pair_ratio_median']:.2f}x); "
                    f"others' CPU {_cores(row, 'quiet')} / {_cores(row, 'busy')} cores "
                    f"(load {load_before[0]:.2f} -> {load_after[0]:.2f})"
                )
            del llm

    table = Table(title="batch-1 tokens/s, quiet and beside busy processes (medians)")
    cols = ("model", "dtype", "threads", "quiet", "busy", "quiet/busy", "pairs", "others' CPU quiet/busy",
            "load before", "after")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            r["model"], r["dtype"], r["mode"], f"{r['quiet']:.1f}", f"{r['busy']:.1f}",
            f"{r['quiet_over_busy']:.2f}x", f"{r['pair_ratio_median']:.2f}x",
            f"{_cores(r, 'quiet')} / {_cores(r, 'busy')}",
            " ".join(f"{x:.2f}" for x in r["load_before"]),
            " ".join(f"{x:.2f}" for x in r["load_after"]),
        )  # fmt: skip
    console.print(table)
    if args.result_file:
        Path(args.result_file).write_text(json.dumps({"args": vars(args) | {"func": None},
                                                      "results": results}, indent=2))  # fmt: skip
    return 0


def _cores(row: dict[str, Any], kind: str) -> str:
    v = row["others_cores"][kind]
    return "-" if v is None else f"{v:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
