"""Perplexity under KV compression: int8 / int4 KV and StreamingLLM / H2O eviction, against full KV.

``python -m tokenmill.bench.kv_accuracy`` tokenizes the bundled model's
held-out text (``tokenmill.models.HELDOUT_SAMPLE_PATH``), cuts it into
non-overlapping windows of ``--window`` tokens and runs each window through
the engine (``LLM``) as a prompt whose logprobs it asks for
(``prompt_logprobs=0``): the same scheduler, KV manager, executor and
compiled kernels that serve requests. Perplexity is ``exp`` of the mean
negative log-likelihood of every token after the first of each window.

- KV dtypes (``--kv-dtypes``): each window is one prefill, and attention reads
  every key and value back from the cache, so each token's logits see its
  whole context quantized as a decode step would.
- Eviction (``--policies`` at ``--budget`` of the window; H2O keeps half its
  budget for recent tokens and half for heavy hitters unless ``h2o@N`` says N recent): the prompt is fed
  in chunks of ``--eviction-chunk`` tokens (1: token by token, as decoding
  runs); after every chunk the cache drops down to the budget, so later
  tokens are predicted from the kept KV only.

- 2-bit KV (``--two-bit``), simulated: tokenmill has no 2-bit cache format, so
  these rows keep the cache in the model's dtype and round every K and V to 2
  bits (4 levels, asymmetric) right after the KV-write kernel stores them:
  ``int2`` per token and head (as int4 is), ``kivi2`` keys per channel over
  each 16-token block and values per token (KIVI's grouping, without its
  full-precision window of recent tokens: every token is rounded).

It prints each row's perplexity and its ratio to full-precision KV.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from tokenmill.core.kv_eviction import KVEviction
from tokenmill.core.request import SamplingParams
from tokenmill.models import DEFAULT_MODEL_PATH, HELDOUT_SAMPLE_PATH


def fake_quant(x: torch.Tensor, bits: int, groups: torch.Tensor | None = None) -> torch.Tensor:
    """``x [T, H, D]`` rounded to ``bits`` (asymmetric min/max): per row of D, or, with ``groups [T]``,
    per channel over the tokens of each group."""
    x = x.float()
    if groups is None:
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    else:
        g = torch.unique(groups, return_inverse=True)[1]
        idx = g[:, None, None].expand_as(x)
        shape = (int(g.max()) + 1, *x.shape[1:])
        lo = torch.full(shape, float("inf")).scatter_reduce(0, idx, x, "amin")[g]
        hi = torch.full(shape, float("-inf")).scatter_reduce(0, idx, x, "amax")[g]
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    return torch.round((x - lo) / scale).clamp(0, 2**bits - 1) * scale + lo


class TwoBitKV:
    """The model's ops, but every K and V the KV write stores is then rounded to 2 bits (simulated)."""

    def __init__(self, ops: Any, kivi: bool) -> None:
        self._ops, self._kivi = ops, kivi

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ops, name)

    def rope_write_kv(self, qkv, positions, cos_sin, kv_cache, slot_mapping, num_heads, num_kv_heads,  # noqa: ANN001
                      kv_format) -> None:  # noqa: ANN001  # fmt: skip
        from tokenmill.model.kv_format import read_tokens, write_tokens

        self._ops.rope_write_kv(qkv, positions, cos_sin, kv_cache, slot_mapping, num_heads, num_kv_heads, kv_format)
        head_dim = cos_sin.shape[-1]
        bs = kv_format.block_size_of(kv_cache, head_dim)
        slots = slot_mapping.long()
        slots = slots[slots >= 0]
        k, v = read_tokens(kv_cache, slots // bs, slots % bs, head_dim, kv_format)
        k = fake_quant(k, 2, slots // bs if self._kivi else None)
        v = fake_quant(v, 2)
        write_tokens(kv_cache, k.to(kv_cache.dtype), v.to(kv_cache.dtype), slots, kv_format)


def nll(windows: list[list[int]], model: str, dtype: str, kv_cache_dtype: str = "auto",
        eviction: KVEviction | None = None, chunk: int | None = None, two_bit: str | None = None,
        ) -> tuple[float, int]:  # fmt: skip
    """Summed negative log-likelihood of every window's tokens after the first, and their count."""
    from tokenmill.llm import LLM

    width = max(len(w) for w in windows)
    llm = LLM(model, dtype=dtype, kv_cache_memory=256 << 20, kv_cache_dtype=kv_cache_dtype,
              max_num_batched_tokens=chunk or width, kv_eviction=eviction, enable_prefix_caching=False)  # fmt: skip
    engine = llm.engine
    if two_bit is not None:
        net = engine.executor.model
        net.ops = TwoBitKV(net.ops, kivi=two_bit == "kivi2")
    # A window of the model's full context plus the one (discarded) sampled token: nothing
    # past the context is computed, but the engine's length check counts that token.
    engine.max_model_len = max(engine.max_model_len, width + 1)
    engine.scheduler.config.max_model_len = engine.max_model_len
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    total, count = 0.0, 0
    for w in windows:
        out = llm.generate([w], params)[0]
        for p in range(1, len(w)):
            total -= out.prompt_logprobs[p][w[p]].logprob
        count += len(w) - 1
    assert engine.scheduler.kv.pool.num_used == 0
    return total, count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    p.add_argument("--text", default=str(HELDOUT_SAMPLE_PATH))
    p.add_argument("--dtype", default="float32", help="the model's compute dtype (and full-precision KV's)")
    p.add_argument("--window", type=int, default=1024, help="tokens per window")
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--kv-dtypes", default="auto,int8,int4")
    p.add_argument("--two-bit", default="int2,kivi2", help="simulated 2-bit rows ('' for none)")
    p.add_argument("--policies", default="streaming,h2o",
                   help="eviction rows: streaming, h2o; POLICY@N sets a recent window of N tokens")
    p.add_argument("--budget", type=float, default=0.25, help="KV budget, a fraction of the window")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--eviction-chunk", type=int, default=1, help="prompt tokens per step under eviction")
    args = p.parse_args(argv)

    from tokenmill.tokenizer import load_tokenizer

    ids = load_tokenizer(args.model).encode(Path(args.text).read_text(), add_special_tokens=False)
    windows = [ids[i : i + args.window] for i in range(0, len(ids), args.window)]
    windows = [w for w in windows if len(w) == args.window][: args.max_windows]  # full windows only
    if not windows:
        raise SystemExit(f"the text has fewer than {args.window} tokens")
    budget = max(1, round(args.budget * args.window))
    print(f"{args.model}: {len(windows)} windows of {args.window} tokens ({args.dtype} model); "
          f"eviction budget {budget} tokens, {args.sinks} sinks, chunks of {args.eviction_chunk}")  # fmt: skip
    rows: list[tuple[str, str, KVEviction | None, int | None, str | None]] = [
        (f"kv {d}", d, None, None, None) for d in args.kv_dtypes.split(",") if d
    ]
    rows += [(f"kv {b} (simulated)", "auto", None, None, b) for b in args.two_bit.split(",") if b]
    for item in [x for x in args.policies.split(",") if x]:
        policy, _, recent = item.partition("@")  # h2o@192: a recent window of 192 (else the policy's own)
        spec = KVEviction(policy, budget, sinks=args.sinks, recent=int(recent) if recent else None)
        rows.append((f"{item} {budget}/{args.window}", "auto", spec, args.eviction_chunk, None))
    base: float | None = None
    for name, kv_dtype, eviction, chunk, two_bit in rows:
        t0 = time.perf_counter()
        total, count = nll(windows, args.model, args.dtype, kv_dtype, eviction, chunk, two_bit)
        ppl = math.exp(total / count)
        if name == "kv auto":
            base = ppl
        ratio = f"{100 * (ppl / base - 1):+.3f}%" if base else ""
        print(f"  {name:>22}: perplexity {ppl:8.4f} {ratio:>9} vs full KV ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
