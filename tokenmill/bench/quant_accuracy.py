"""Perplexity of a checkpoint through tokenmill in fp32, bf16 and int8 (weight-only).

``python -m tokenmill.bench.quant_accuracy`` tokenizes the bundled model's
held-out text (``tokenmill.models.HELDOUT_SAMPLE_PATH``), cuts it into
non-overlapping windows of ``--window`` tokens and runs each window through
tokenmill's model as one teacher-forced prefill over a paged KV cache (the same
forward and LM head the engine uses). The loss is the mean negative
log-likelihood of every token after the first of each window; perplexity is
``exp(loss)``. It prints each dtype's perplexity and its ratio to bf16, so
the cost of 8-bit weights is read against the dtype they replace.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenmill.model import AttentionMetadata, load_model
from tokenmill.model.attention import kv_cache_shape
from tokenmill.model.decoder import DecoderModel
from tokenmill.models import DEFAULT_MODEL_PATH, HELDOUT_SAMPLE_PATH
from tokenmill.tokenizer import load_tokenizer

BLOCK_SIZE = 16


def window_nll(model: DecoderModel, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ``ids[1:]`` given their prefixes, and its token count."""
    cfg = model.config
    n = len(ids)
    num_blocks = (n + BLOCK_SIZE - 1) // BLOCK_SIZE
    kv = [
        torch.zeros(
            kv_cache_shape(num_blocks, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim),
            dtype=model.dtype,
        )
        for _ in range(cfg.num_layers)
    ]
    pos = torch.arange(n)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=torch.arange(num_blocks, dtype=torch.int32)[None],
        slot_mapping=pos,  # blocks 0, 1, ... in order: slot == position
        max_query_len=n,
        max_seq_len=n,
    )
    tokens = torch.tensor(ids)
    logits = model.compute_logits(model(tokens, pos, kv, meta))  # fp32 [n, vocab]
    loss = F.cross_entropy(logits[:-1], tokens[1:], reduction="sum")
    return float(loss), n - 1


def perplexity(model_path: Path, dtype: str, windows: list[list[int]]) -> float:
    model, _ = load_model(model_path, dtype=dtype)
    total, count = 0.0, 0
    for w in windows:
        nll, n = window_nll(model, w)
        total, count = total + nll, count + n
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    p.add_argument("--text", default=str(HELDOUT_SAMPLE_PATH))
    p.add_argument("--dtypes", default="float32,bfloat16,int8")
    p.add_argument("--window", type=int, default=512, help="tokens per teacher-forced window")
    args = p.parse_args(argv)

    tokenizer = load_tokenizer(args.model)
    ids = tokenizer.encode(Path(args.text).read_text(), add_special_tokens=False)
    windows = [ids[i : i + args.window] for i in range(0, len(ids), args.window)]
    windows = [w for w in windows if len(w) > 1]
    print(f"{args.model}: {len(ids)} held-out tokens in {len(windows)} windows of <= {args.window}")
    results: dict[str, float] = {}
    for dtype in [d for d in args.dtypes.split(",") if d]:
        t0 = time.perf_counter()
        results[dtype] = perplexity(Path(args.model), dtype, windows)
        print(f"  {dtype:>9}: perplexity {results[dtype]:.4f} ({time.perf_counter() - t0:.1f} s)")
    if "bfloat16" in results:
        print("ratio to bfloat16: " + ", ".join(
            f"{d} {ppl / results['bfloat16']:.5f}" for d, ppl in results.items()
        ))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
