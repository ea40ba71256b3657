"""``tokenmill bench throughput``: offline generation tokens/s, tokenmill beside its peers.

Every cell (dtype x batch size) runs tokenmill and each peer on the same
checkpoint and the same prompts (random token ids, fixed prompt length,
greedy, exactly ``output_len`` new tokens each), prefill included, and
prints output tokens/s, tokenmill's ratio to the best peer, and the fraction
of this machine's roofline measured in the same run. Each system runs each
cell in a fresh process (warm-up, then the timed job), so a second table gives
every system's peak memory for the cell, and tokenmill's cells report the cold
start to the first token.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

DEFAULT_CACHE = Path(os.environ.get("TOKENMILL_CACHE", Path.home() / ".cache" / "tokenmill"))
# "int8" is weight-only: 1 byte per weight, bf16 activations and matmul throughput
BYTES_PER_PARAM = {"float32": 4, "int8": 1}
COMPUTE_DTYPE = {"int8": "bfloat16"}
# dtypes of peers that list none (transformers takes any torch float dtype, not int8)
TORCH_DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="HF checkpoint directory (default: a synthetic model of --shape)",
    )
    p.add_argument(
        "--shape", default="smollm-135m", help="synthetic shape when --model is not given"
    )
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument(
        "--peers", default="hf", help="comma list of peers: hf, llamacpp, vllm ('' for none)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-file", default=None, help="write all figures as JSON here")


def _prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(prompt_len)] for _ in range(batch)]


def tokenmill_generate(
    model_dir: str, dtype: str, prompts: list[list[int]], output_len: int
) -> dict[str, Any]:
    """One cell for tokenmill, in a fresh process like every peer (``throughput_runner``)."""
    from tokenmill.bench.peers import KV_CACHE_GIB, _venv

    job = {
        "model_dir": str(model_dir), "dtype": dtype, "prompts": prompts, "output_len": output_len,
        "kv_cache_memory": KV_CACHE_GIB << 30,
    }  # fmt: skip
    return _venv.run_script(sys.executable, Path(__file__).with_name("throughput_runner.py"), job)


def _checked(name: str, result: dict[str, Any], batch: int, output_len: int) -> dict[str, Any]:
    counts = [len(t) for t in result["tokens"]]
    if counts != [output_len] * batch:
        raise RuntimeError(
            f"{name} generated {counts} tokens, expected {output_len} for each of {batch} prompts"
        )
    return result


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tokenmill.bench import roofline
    from tokenmill.bench.peers import PEERS
    from tokenmill.bench.synthetic_model import make_model, num_params
    from tokenmill.model import kernels

    console = Console(width=None if sys.stdout.isatty() else 160)  # whole tables in logs
    model_dir = args.model or str(make_model(DEFAULT_CACHE / "bench" / args.shape, args.shape))
    config = json.loads((Path(model_dir) / "config.json").read_text())
    total, body = num_params(config)
    dtypes = [d for d in args.dtypes.split(",") if d]
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    peers = [p for p in args.peers.split(",") if p]
    console.print(
        f"model {model_dir}: {total / 1e6:.1f}M params; prompt {args.prompt_len}, output {args.output_len}"
    )
    # Build (or find cached) the CPU kernels here, so no cell's cold start includes compiling them.
    kernels.cpu_kernels_available()
    limits = roofline.measure(sorted({COMPUTE_DTYPE.get(d, d) for d in dtypes}))
    console.print(
        f"machine: {os.cpu_count()} cores, {limits.bandwidth_gbs:.1f} GB/s read bandwidth, matmul "
        + ", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in limits.matmul_gflops.items())
    )
    peer_modules = {}
    for name in peers:
        mod = importlib.import_module(PEERS[name])
        why = mod.available()
        if why:
            console.print(f"[yellow]peer {name} skipped: {why}[/yellow]")
        else:
            peer_modules[name] = mod

    results: list[dict[str, Any]] = []
    for dtype in dtypes:
        bytes_per_param = BYTES_PER_PARAM.get(dtype, 2)
        for batch in batches:
            prompts = _prompts(batch, args.prompt_len, config["vocab_size"], args.seed)
            n_out = batch * args.output_len
            row: dict[str, Any] = {"dtype": dtype, "batch": batch, "peak_memory_mb": {}}
            res = _checked(
                "tokenmill",
                tokenmill_generate(model_dir, dtype, prompts, args.output_len),
                batch,
                args.output_len,
            )
            row["tokenmill"] = n_out / res["seconds"]
            row["peak_memory_mb"]["tokenmill"] = res["peak_memory_mb"]
            row["cold_start_s"] = res["cold_start_s"]
            row["process_start_s"] = res["process_start_s"]
            for name, mod in peer_modules.items():
                if dtype not in getattr(mod, "DTYPES", TORCH_DTYPES):
                    row[name] = None  # this peer has no such dtype
                    continue
                res = _checked(
                    name,
                    mod.generate(model_dir, dtype, prompts, args.output_len),
                    batch,
                    args.output_len,
                )
                row[name] = n_out / res["seconds"]
                row["peak_memory_mb"][name] = res["peak_memory_mb"]
            row["roofline"] = roofline.job_tokens_per_s(
                limits,
                COMPUTE_DTYPE.get(dtype, dtype),
                total,
                body,
                bytes_per_param,
                batch,
                args.prompt_len,
                args.output_len,
            )
            best = max((row[n] for n in peer_modules if row[n] is not None), default=None)
            row["ratio_to_best_peer"] = row["tokenmill"] / best if best else None
            row["fraction_of_roofline"] = row["tokenmill"] / row["roofline"]
            results.append(row)
            console.print(row)

    _print_tables(console, results, list(peer_modules))
    first = results[0]
    console.print(
        f"cold start to first token ({first['dtype']}): {first['cold_start_s']:.2f} s from engine construction, "
        f"{first['process_start_s']:.2f} s from process start (imports included)"
    )
    if args.result_file:
        Path(args.result_file).write_text(
            json.dumps(
                {
                    "model": model_dir,
                    "limits": vars(limits),
                    "results": results,
                    "cold_start_s": first["cold_start_s"],
                    "process_start_s": first["process_start_s"],
                    "args": vars(args) | {"func": None},
                },
                indent=2,
                default=str,
            )  # fmt: skip
        )
    return 0


def _print_tables(console: Any, results: list[dict[str, Any]], peers: list[str]) -> None:
    from rich.table import Table

    table = Table(title="output tokens/s (prefill included)")
    for col in [
        "dtype",
        "batch",
        "tokenmill",
        *peers,
        "ratio to best peer",
        "roofline",
        "of roofline",
    ]:
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            r["dtype"], str(r["batch"]), f"{r['tokenmill']:.1f}", *(f"{r[n]:.1f}" if r[n] is not None else "-" for n in peers),
            f"{r['ratio_to_best_peer']:.2f}x" if r["ratio_to_best_peer"] else "-",
            f"{r['roofline']:.0f}", f"{100 * r['fraction_of_roofline']:.0f}%",
        )  # fmt: skip
    console.print(table)
    memory = Table(title="peak memory of each system's processes, MB (bench/process_memory.py)")
    systems = ["tokenmill", *peers]
    for col in ["dtype", "batch", *systems]:
        memory.add_column(col, justify="right")
    for r in results:
        mem = r["peak_memory_mb"]
        memory.add_row(
            r["dtype"], str(r["batch"]), *(f"{mem[n]:.0f}" if n in mem else "-" for n in systems)
        )
    console.print(memory)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    return run(p.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
