"""``tokenmill bench throughput``: offline generation tokens/s, tokenmill beside its peers.

Every cell (dtype x batch size) runs tokenmill and each peer on the same
checkpoint and the same prompts (random token ids, fixed prompt length,
greedy, exactly ``output_len`` new tokens each), prefill included, and
prints output tokens/s, tokenmill's ratio to the best peer, and the fraction
of this machine's roofline measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import resource
import time
from pathlib import Path
from typing import Any

DEFAULT_CACHE = Path(os.environ.get("TOKENMILL_CACHE", Path.home() / ".cache" / "tokenmill"))
# "int8" is weight-only: 1 byte per weight, bf16 activations and matmul throughput
BYTES_PER_PARAM = {"float32": 4, "int8": 1}
COMPUTE_DTYPE = {"int8": "bfloat16"}
# dtypes of peers that list none (transformers takes any torch float dtype, not int8)
TORCH_DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF checkpoint directory (default: a synthetic model of --shape)")
    p.add_argument("--shape", default="smollm-135m", help="synthetic shape when --model is not given")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--peers", default="hf", help="comma list of peers: hf, llamacpp, vllm ('' for none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-file", default=None, help="write all figures as JSON here")


def _prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(prompt_len)] for _ in range(batch)]


def tokenmill_seconds(llm: Any, prompts: list[list[int]], output_len: int) -> float:
    from tokenmill.core.request import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
    return elapsed


def _make_llm(model_dir: str, dtype: str, batch: int, prompt_len: int, output_len: int) -> Any:
    from tokenmill.llm import LLM

    return LLM(
        model_dir,
        dtype=dtype,
        kv_cache_memory=512 << 20,
        max_num_seqs=max(batch, 1),
        max_num_batched_tokens=max(2048, prompt_len),
    )


def cold_start_seconds(model_dir: str, dtype: str) -> float:
    """Time from constructing the engine to the first generated token (one short prompt)."""
    from tokenmill.core.request import SamplingParams
    from tokenmill.llm import LLM

    t0 = time.perf_counter()
    llm = LLM(model_dir, dtype=dtype, kv_cache_memory=64 << 20)
    llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tokenmill.bench import roofline
    from tokenmill.bench.peers import PEERS
    from tokenmill.bench.synthetic_model import make_model, num_params

    console = Console()
    model_dir = args.model or str(make_model(DEFAULT_CACHE / "bench" / args.shape, args.shape))
    config = json.loads((Path(model_dir) / "config.json").read_text())
    total, body = num_params(config)
    dtypes = [d for d in args.dtypes.split(",") if d]
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    peers = [p for p in args.peers.split(",") if p]
    console.print(f"model {model_dir}: {total / 1e6:.1f}M params; prompt {args.prompt_len}, output {args.output_len}")
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
        llm = _make_llm(model_dir, dtype, max(batches), args.prompt_len, args.output_len)
        tokenmill_seconds(llm, _prompts(2, 16, config["vocab_size"], 99), 4)  # warm-up (kernel build)
        for batch in batches:
            prompts = _prompts(batch, args.prompt_len, config["vocab_size"], args.seed)
            n_out = batch * args.output_len
            row: dict[str, Any] = {"dtype": dtype, "batch": batch}
            row["tokenmill"] = n_out / tokenmill_seconds(llm, prompts, args.output_len)
            for name, mod in peer_modules.items():
                if dtype not in getattr(mod, "DTYPES", TORCH_DTYPES):
                    row[name] = None  # this peer has no such dtype
                    continue
                row[name] = n_out / mod.generate_seconds(model_dir, dtype, prompts, args.output_len)
            row["roofline"] = roofline.job_tokens_per_s(
                limits, COMPUTE_DTYPE.get(dtype, dtype), total, body, bytes_per_param, batch, args.prompt_len, args.output_len
            )
            best = max((row[n] for n in peer_modules if row[n] is not None), default=None)
            row["ratio_to_best_peer"] = row["tokenmill"] / best if best else None
            row["fraction_of_roofline"] = row["tokenmill"] / row["roofline"]
            results.append(row)
            console.print(row)
        del llm
    cold = cold_start_seconds(model_dir, dtypes[0])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    table = Table(title="output tokens/s (prefill included)")
    for col in ["dtype", "batch", "tokenmill", *peer_modules, "ratio to best peer", "roofline", "of roofline"]:
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            r["dtype"], str(r["batch"]), f"{r['tokenmill']:.1f}", *(f"{r[n]:.1f}" if r[n] is not None else "-" for n in peer_modules),
            f"{r['ratio_to_best_peer']:.2f}x" if r["ratio_to_best_peer"] else "-",
            f"{r['roofline']:.0f}", f"{100 * r['fraction_of_roofline']:.0f}%",
        )  # fmt: skip
    console.print(table)
    console.print(f"cold start to first token ({dtypes[0]}): {cold:.2f} s; peak RSS of this process: {peak_mb:.0f} MB")
    if args.result_file:
        Path(args.result_file).write_text(
            json.dumps(
                {"model": model_dir, "limits": vars(limits), "results": results, "cold_start_s": cold,
                 "peak_rss_mb": peak_mb, "args": vars(args) | {"func": None}},
                indent=2, default=str,
            )  # fmt: skip
        )
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    return run(p.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
