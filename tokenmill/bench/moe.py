"""``tokenmill bench moe``: MoE decode speed against transformers, and expert offloading.

On one Mixtral-shaped checkpoint with seeded random weights (made here, see
``SHAPES``) and the same random prompts, each cell runs in a fresh process
(``moe_runner``) and measures decode tokens/s: ``batch * (n - 1) / (t_n - t_1)``,
the time of ``n`` greedy tokens minus the time of one, so prefill cancels out;
the best of ``--repeats`` (other load on the machine only ever slows a run down;
the median is kept in the JSON too).

Rows per batch size:

- ``tokenmill``: every expert in RAM (grouped-GEMM expert kernel);
- ``transformers``: ``generate`` with its default experts implementation
  (``grouped_mm`` where torch has it);
- ``tokenmill offload``: ``--expert-cache-memory`` of half the experts' bytes,
  the rest memory-mapped (HybriMoE-style replacement, next-layer prefetch);
  with ``--no-prefetch-row``, also the same without prefetching;
- with ``--int8-row``, ``tokenmill int8``: the same model with weight-only int8
  (1 byte per weight; transformers' CPU ``generate`` has no counterpart, so its
  ratio is to transformers at ``--dtype``).

It prints tokens/s, the ratio to transformers, the cache's hit rate and
bytes read, resident memory, and whether the offloaded outputs equal the
fully resident ones (they must), with the load average before and after, and
the decode roofline of this machine: a step reads every non-expert weight and
the experts its tokens reach (``ModelShape.experts_touched``) at the read
bandwidth measured in the same run (with the cells' thread count).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
from pathlib import Path
from typing import Any

DEFAULT_CACHE = Path(os.environ.get("TOKENMILL_CACHE", Path.home() / ".cache" / "tokenmill"))

SHAPES: dict[str, dict[str, Any]] = {
    # 364M parameters, 136M active per token (8 experts of 4.7M per layer, top-2)
    "mixtral-small": dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=512,
        max_position_embeddings=512,
    ),
}  # fmt: skip


def make_mixtral(path: str | Path, shape: str = "mixtral-small", seed: int = 0) -> Path:
    """Write a Mixtral checkpoint with seeded random weights and a tokenizer, unless it exists."""
    import torch
    import transformers

    from tokenmill.bench.synthetic_model import write_tokenizer

    path = Path(path)
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    kw = SHAPES[shape]
    config = transformers.MixtralConfig(**kw, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                # a wider router makes routing depend on the token, as in trained models
                p.normal_(0.0, 0.5 if "gate.weight" in name else 0.05)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, kw["vocab_size"])
    return path


def expert_bytes(model_dir: Path, dtype: str) -> int:
    """RAM that every expert takes once prepared for tokenmill's kernels."""
    from tokenmill.model.loader import load_model

    model, _ = load_model(model_dir, dtype=dtype, expert_cache_memory=0)
    return model.experts.total_expert_bytes()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Mixtral-family HF checkpoint (default: synthetic --shape)")
    p.add_argument("--shape", default="mixtral-small", choices=sorted(SHAPES))
    p.add_argument("--work-dir", default=str(DEFAULT_CACHE / "bench"), help="where synthetic models are written")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"])
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--cache-fraction", type=float, default=0.5, help="expert cache / all expert bytes")
    p.add_argument("--no-prefetch-row", action="store_true", help="also run offloading without prefetch")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--skip-offload", action="store_true", help="only tokenmill and transformers")
    p.add_argument("--int8-row", action="store_true", help="also tokenmill with int8 weights")
    p.add_argument("--threads", type=int, default=None, help="torch threads of every cell (default: torch's)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell (the best is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-file", default=None, help="write all figures as JSON here")


def _cell(job: dict[str, Any]) -> dict[str, Any]:
    from tokenmill.bench.peers import _venv

    return _venv.run_script(sys.executable, Path(__file__).with_name("moe_runner.py"), job)


def decode_rates(res: dict[str, Any], batch: int, output_len: int, clock: str = "t") -> list[float]:
    """Decode tokens per second of each timed repetition, by wall time (``clock="t"``) or by
    the process's CPU time (``"cpu"``)."""
    return [
        batch * (output_len - 1) / (full - one) if full > one else float("inf")
        for one, full in zip(res[f"{clock}_one"], res[f"{clock}_full"], strict=True)
    ]


def decode_tps(res: dict[str, Any], batch: int, output_len: int, clock: str = "t") -> float:
    return max(decode_rates(res, batch, output_len, clock))


BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "int8": 1}


def roofline_tps(cfg: dict[str, Any], dtype: str, batch: int, bandwidth_gbs: float) -> float:
    """Decode tokens/s if a step only read its weights at ``bandwidth_gbs``."""
    from tokenmill.sim.model_spec import ModelShape

    shape = ModelShape.from_hf_config(cfg)
    experts = shape.num_moe_layers * shape.num_experts * shape.expert_params
    embedding = shape.vocab_size * shape.hidden_size  # a lookup reads a row, not the table
    touched = shape.num_moe_layers * shape.experts_touched(batch) * shape.expert_params
    step_bytes = (shape.num_params - experts - embedding + touched) * BYTES_PER_PARAM[dtype]
    return batch * bandwidth_gbs * 1e9 / step_bytes


def run(args: argparse.Namespace) -> int:
    model_dir = Path(args.model) if args.model else make_mixtral(Path(args.work_dir) / args.shape, args.shape)
    cfg = json.loads((model_dir / "config.json").read_text())
    total = expert_bytes(model_dir, args.dtype)
    cache = int(total * args.cache_fraction)
    import torch

    from tokenmill.bench.roofline import measure_bandwidth

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    bandwidth = measure_bandwidth()
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    print(f"read bandwidth {bandwidth:.1f} GB/s ({args.threads or threads} threads)")
    print(f"model {model_dir} ({args.dtype}, threads {args.threads or 'default'}); experts {total / 2**20:.1f} MiB, cache {cache / 2**20:.1f} MiB; "
          f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")  # fmt: skip
    results: list[dict[str, Any]] = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        rng = random.Random(args.seed + batch)
        prompts = [[rng.randrange(1, cfg["vocab_size"]) for _ in range(args.prompt_len)] for _ in range(batch)]
        base = dict(model_dir=str(model_dir), dtype=args.dtype, prompts=prompts, output_len=args.output_len,
                    threads=args.threads, repeats=args.repeats)
        rows = {"tokenmill": dict(system="tokenmill")}
        if not args.skip_transformers and args.dtype != "int8":
            rows["transformers"] = dict(system="transformers")
        if args.int8_row and args.dtype != "int8":
            rows["tokenmill int8"] = dict(system="tokenmill", dtype="int8")
        if not args.skip_offload:
            rows["tokenmill offload"] = dict(system="tokenmill", expert_cache_memory=cache)
        if args.no_prefetch_row and not args.skip_offload:
            rows["tokenmill offload, no prefetch"] = dict(system="tokenmill", expert_cache_memory=cache, prefetch=False)
        cells = {name: _cell({**base, **extra}) for name, extra in rows.items()}
        ref = cells["tokenmill"]["tokens"]
        hf = cells.get("transformers")
        for name, res in cells.items():
            tps = decode_tps(res, batch, args.output_len)
            row = {
                "batch": batch, "system": name, "decode_tokens_per_s": tps,
                "roofline_tokens_per_s": roofline_tps(cfg, rows[name].get("dtype", args.dtype), batch, bandwidth),
                "decode_tokens_per_s_median": statistics.median(decode_rates(res, batch, args.output_len)),
                "decode_tokens_per_cpu_s": decode_tps(res, batch, args.output_len, "cpu"),
                "cpu_vs_transformers": decode_tps(res, batch, args.output_len, "cpu")
                / decode_tps(hf, batch, args.output_len, "cpu") if hf else None,
                "vs_transformers": tps / decode_tps(hf, batch, args.output_len) if hf else None,
                # only the rows of the same dtype can match token for token
                "same_tokens_as_tokenmill": res["tokens"] == ref if name != "tokenmill int8" else None,
                "expert_cache": res.get("expert_cache"),
                "rss_anon_mb": res["rss_anon_mb"], "rss_file_mb": res["rss_file_mb"],
            }  # fmt: skip
            if name == "transformers":
                same = sum(a == b for x, y in zip(res["tokens"], ref, strict=True) for a, b in zip(x, y, strict=True))
                row["token_agreement_with_tokenmill"] = same / (batch * args.output_len)
            results.append(row)
    load_after = os.getloadavg()
    print("\n| batch | system | decode tok/s | vs transformers | tok/CPU-s | vs transformers (CPU) "
          "| of roofline | hit rate | read MiB | anon MiB | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ec = r["expert_cache"] or {}
        ratio = f"{r['vs_transformers']:.2f}x" if r["vs_transformers"] else "-"
        cpu_ratio = f"{r['cpu_vs_transformers']:.2f}x" if r["cpu_vs_transformers"] else "-"
        hit = f"{ec['hit_rate']:.3f}" if ec else "-"
        read = f"{ec['bytes_read'] / 2**20:.0f}" if ec else "-"
        same = {True: "yes", False: "NO", None: "-"}[r["same_tokens_as_tokenmill"]]
        if r["system"] == "transformers":
            same = f"{r['token_agreement_with_tokenmill']:.0%} agree"
        print(f"| {r['batch']} | {r['system']} | {r['decode_tokens_per_s']:.1f} | {ratio} | "
              f"{r['decode_tokens_per_cpu_s']:.1f} | {cpu_ratio} | "
              f"{r['decode_tokens_per_s'] / r['roofline_tokens_per_s']:.0%} | {hit} | {read} | "
              f"{r['rss_anon_mb']:.0f} | {same} |")  # fmt: skip
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(
            {"model": str(model_dir), "dtype": args.dtype, "expert_bytes": total, "cache_bytes": cache,
             "bandwidth_gbs": bandwidth, "threads": args.threads,
             "load_before": load_before, "load_after": load_after, "results": results}, indent=1))  # fmt: skip
    offload_ok = all(r["same_tokens_as_tokenmill"] for r in results if "offload" in r["system"])
    return 0 if offload_ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
