"""``tokenmill bench lora``: output tokens/s of a batch mixing LoRA adapters, against the base alone.

On one checkpoint (default: the SmolLM-135M-shaped synthetic model of
``synthetic_model``) and ``--adapters`` seeded random PEFT adapters of rank
``--rank`` on every linear layer of every decoder layer (q/k/v/o and
gate/up/down: the most LoRA work per token), one engine runs the same
``--batch`` random prompts two ways in the same process, alternately
``--repeats`` times:

- ``base``: every request on the base model;
- ``lora``: request ``i`` with adapter ``i % adapters``, all in one batch
  (every step mixes every adapter: the grouped kernel's case).

Greedy, exactly ``--output-len`` new tokens each, prefill included, prefix
caching off (the repeats would otherwise hit the cache). It prints each
run's output tokens/s (and per CPU second of the process), the best and
median per mode, the ratio of the medians (lora / base) and of each
repeat's two runs, the share of requests whose tokens differ from the
base model's (the adapters did run), and the load average before and after:
the machine is shared, so runs are interleaved and repeated rather than
trusted one by one.

    tokenmill bench lora --batch 32 --adapters 8 --rank 16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

DEFAULT_CACHE = Path(os.environ.get("TOKENMILL_CACHE", Path.home() / ".cache" / "tokenmill"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF checkpoint directory (default: a synthetic model of --shape)")
    p.add_argument("--shape", default="smollm-135m", help="synthetic shape when --model is not given")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="auto", help="ops backend (auto, torch, cpu_kernels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--work-dir", default=str(DEFAULT_CACHE), help="where the synthetic model and adapters are written")
    p.add_argument("--result-file", default=None, help="write all figures as JSON here")


def make_adapters(model_dir: Path, out: Path, count: int, rank: int) -> list[Path]:
    """``count`` random rank-``rank`` adapters on every linear layer (cached under ``out``)."""
    from tokenmill.lora.testing import write_random_adapter

    paths = []
    for i in range(count):
        path = out / f"r{rank}-{i}"
        if not (path / "adapter_model.safetensors").exists():
            write_random_adapter(path, model_dir, rank=rank, seed=1000 + i, std=0.02)
        paths.append(path)
    return paths


def _timed(
    llm: Any, prompts: list[list[int]], params: Any, loras: list[Any] | None
) -> tuple[float, float, list[list[int]]]:
    """(wall seconds, CPU seconds of this process, each request's tokens) of one batch."""
    c0, t0 = time.process_time(), time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora=loras)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return dt, cpu, [list(o.outputs[0].token_ids) for o in outs]


def run(args: argparse.Namespace) -> int:
    import torch

    from tokenmill import LLM, SamplingParams
    from tokenmill.bench.synthetic_model import make_model

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    model_dir = Path(args.model) if args.model else make_model(work / "models" / args.shape, args.shape)
    adapters = make_adapters(model_dir, work / "lora" / model_dir.name, args.adapters, args.rank)
    load_before = os.getloadavg()
    llm = LLM(
        str(model_dir),
        dtype=args.dtype,
        max_num_seqs=max(args.batch, 1),
        max_loras=args.adapters,
        max_lora_rank=args.rank,
        enable_prefix_caching=False,
    )
    if args.backend != "auto":
        llm.engine.executor.model.set_backend(args.backend)
    names = [f"adapter-{i}" for i in range(args.adapters)]
    for name, path in zip(names, adapters, strict=True):
        llm.engine.add_lora(name, str(path))
    vocab = llm.engine.vocab_size
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(1, vocab) for _ in range(args.prompt_len)] for _ in range(args.batch)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    per_request = [names[i % args.adapters] for i in range(args.batch)]
    # warm-up of both paths at full width, outside the measurement
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    _timed(llm, prompts, warm, None)
    _timed(llm, prompts, warm, per_request)
    runs: dict[str, list[float]] = {"base": [], "lora": []}
    cpu_runs: dict[str, list[float]] = {"base": [], "lora": []}  # output tokens per CPU second
    generated: dict[str, list[list[int]]] = {}
    for r in range(args.repeats):
        for mode in ("base", "lora") if r % 2 == 0 else ("lora", "base"):
            dt, cpu, outs = _timed(llm, prompts, params, per_request if mode == "lora" else None)
            generated[mode] = outs
            tokens = sum(map(len, outs))
            runs[mode].append(tokens / dt)
            cpu_runs[mode].append(tokens / cpu)
            print(f"run {r} {mode:>4}: {tokens / dt:8.1f} output tok/s ({dt:.2f} s), "
                  f"{tokens / cpu:8.1f} tok/CPU-s, load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    load_after = os.getloadavg()
    med = {m: statistics.median(v) for m, v in runs.items()}
    ratio = med["lora"] / med["base"]
    # each repeat's two back-to-back runs, as a ratio: less exposed to the load drifting
    pair_ratios = [lo / b for lo, b in zip(runs["lora"], runs["base"], strict=True)]
    cpu_ratio = statistics.median(cpu_runs["lora"]) / statistics.median(cpu_runs["base"])
    # the adapters must have run: requests whose tokens differ from the base model's
    differ = sum(a != b for a, b in zip(generated["lora"], generated["base"], strict=True)) / args.batch
    print(
        f"\n{model_dir.name}, {args.dtype}, batch {args.batch}, {args.adapters} adapters of rank {args.rank} "
        f"on q/k/v/o/gate/up/down, prompt {args.prompt_len}, output {args.output_len}"
    )
    for m in ("base", "lora"):
        print(f"  {m:>4}: median {med[m]:.1f}  best {max(runs[m]):.1f} output tok/s")
    print(f"  lora / base (medians): {ratio:.1%}; per repeat: {', '.join(f'{x:.1%}' for x in pair_ratios)}")
    print(f"  by CPU time: base {statistics.median(cpu_runs['base']):.1f}, lora {statistics.median(cpu_runs['lora']):.1f}"
          f" tok/CPU-s (medians), lora / base {cpu_ratio:.1%}")  # fmt: skip
    print(f"  requests whose output differs from the base model's: {differ:.0%}")
    print(f"  load average before {load_before[0]:.2f} {load_before[1]:.2f}, after {load_after[0]:.2f} {load_after[1]:.2f}")
    if args.result_file:
        Path(args.result_file).write_text(json.dumps({
            "model": str(model_dir), "dtype": args.dtype, "batch": args.batch, "adapters": args.adapters,
            "rank": args.rank, "prompt_len": args.prompt_len, "output_len": args.output_len,
            "runs": runs, "median": med, "ratio": ratio, "pair_ratios": pair_ratios,
            "cpu_runs": cpu_runs, "cpu_ratio": cpu_ratio, "differ_from_base": differ, "load_before": load_before, "load_after": load_after,
        }, indent=2))  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
