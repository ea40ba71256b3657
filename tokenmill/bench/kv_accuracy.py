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

It prints each row's perplexity and its ratio to full-precision KV.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from tokenmill.core.kv_eviction import KVEviction
from tokenmill.core.request import SamplingParams
from tokenmill.models import DEFAULT_MODEL_PATH, HELDOUT_SAMPLE_PATH


def nll(windows: list[list[int]], model: str, dtype: str, kv_cache_dtype: str = "auto",
        eviction: KVEviction | None = None, chunk: int | None = None) -> tuple[float, int]:  # fmt: skip
    """Summed negative log-likelihood of every window's tokens after the first, and their count."""
    from tokenmill.llm import LLM

    width = max(len(w) for w in windows)
    llm = LLM(model, dtype=dtype, kv_cache_memory=256 << 20, kv_cache_dtype=kv_cache_dtype,
              max_num_batched_tokens=chunk or width, kv_eviction=eviction, enable_prefix_caching=False)  # fmt: skip
    engine = llm.engine
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
    rows: list[tuple[str, str, KVEviction | None, int | None]] = [
        (f"kv {d}", d, None, None) for d in args.kv_dtypes.split(",") if d
    ]
    for item in [x for x in args.policies.split(",") if x]:
        policy, _, recent = item.partition("@")  # h2o@192: a recent window of 192 (else the policy's own)
        spec = KVEviction(policy, budget, sinks=args.sinks, recent=int(recent) if recent else None)
        rows.append((f"{item} {budget}/{args.window}", "auto", spec, args.eviction_chunk))
    base: float | None = None
    for name, kv_dtype, eviction, chunk in rows:
        t0 = time.perf_counter()
        total, count = nll(windows, args.model, args.dtype, kv_dtype, eviction, chunk)
        ppl = math.exp(total / count)
        if name == "kv auto":
            base = ppl
        ratio = f"{100 * (ppl / base - 1):+.3f}%" if base else ""
        print(f"  {name:>22}: perplexity {ppl:8.4f} {ratio:>9} vs full KV ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
