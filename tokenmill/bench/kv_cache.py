"""KV cache formats: capacity and decode speed of bf16 vs int8 / int4 KV on a 135M-shaped model.

``python -m tokenmill.bench.kv_cache`` (model: a SmolLM-135M-shaped checkpoint
with seeded random weights, ``bench/synthetic_model.py``; any checkpoint with
``--model``):

- **capacity**: at one ``--kv-cache-memory``, each format's block count is the
  executor's (``ModelExecutor.kv_cache_bytes_per_block``: codes plus scales),
  and the core scheduler, run on ``--capacity-requests`` requests of
  ``--context`` tokens each (admitted all at once where blocks allow) with an
  executor that computes nothing, reports the most sequences that decode in
  one step. Capacity is a fact of block
  accounting and admission, which is the same code the engine runs.
- **speed**: the engine decodes ``--batch`` sequences of ``--context`` tokens
  (distinct random prompts of ``context - output_len`` tokens, then
  ``--output-len`` greedy tokens each). The prefill is not timed; decode
  tokens/s counts the tokens sampled after every sequence has its first one.
  Formats alternate within each of ``--repeats`` rounds, so that machine noise
  falls on all of them; the best round is reported.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

from tokenmill.core.plan import StepResult
from tokenmill.core.request import Request, SamplingParams
from tokenmill.core.scheduler import Scheduler
from tokenmill.engine import EngineConfig

DEFAULT_MODEL_DIR = Path.home() / ".cache" / "tokenmill" / "bench-models" / "smollm-135m"


def capacity(model: str, dtype: str, kv_cache_dtype: str, kv_cache_memory: int, context: int,
             num_requests: int, block_size: int = 16) -> dict[str, Any]:  # fmt: skip
    """Blocks and the most sequences of ``context`` tokens decoding together in one step."""
    from tokenmill.executor.model_executor import ModelExecutor
    from tokenmill.model.loader import read_model_config

    cfg = read_model_config(model, dtype)
    per_block = ModelExecutor.kv_cache_bytes_per_block(cfg, block_size, dtype, kv_cache_dtype)
    num_blocks = kv_cache_memory // per_block
    # One step may prefill every request: admission stops only where the blocks run out.
    config = EngineConfig(model=model, block_size=block_size, max_num_seqs=num_requests,
                          max_num_batched_tokens=context * num_requests, enable_prefix_caching=False)  # fmt: skip
    sched = Scheduler(config.scheduler_config(num_blocks, context))
    out_len = 8
    rng = random.Random(0)
    for i in range(num_requests):
        prompt = [rng.randrange(1, 1000) for _ in range(context - out_len)]
        sched.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=out_len, ignore_eos=True)))
    most = 0
    while sched.has_unfinished():
        plan = sched.schedule(0.0)
        most = max(most, sum(1 for s in plan.seqs if s.samples and s.num_new_tokens == 1))
        sched.update(plan, StepResult({s.request_id: [7] * plan.num_steps for s in plan.seqs if s.samples}))
    assert sched.kv.pool.num_used == 0
    return {"kv_cache_dtype": kv_cache_dtype, "bytes_per_block": per_block, "num_blocks": num_blocks,
            "seqs_at_once": most}  # fmt: skip


def decode_speed(model: str, dtype: str, kv_cache_dtype: str, batch: int, context: int, output_len: int,
                 seed: int = 0) -> float:  # fmt: skip
    """Decode tokens/s of ``batch`` sequences at ``context`` tokens (prefill not timed)."""
    from tokenmill.llm import LLM

    per_seq = context + 16
    llm = LLM(model, dtype=dtype, kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=False,
              kv_cache_memory=_bytes_for(model, dtype, kv_cache_dtype, batch * per_seq),
              max_num_batched_tokens=context, max_num_seqs=batch)  # fmt: skip
    engine = llm.engine
    rng = random.Random(seed)
    vocab = engine.vocab_size
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    for i in range(batch):
        engine.add_request(f"s{i}", [rng.randrange(1, vocab) for _ in range(context - output_len)], params)
    reqs = list(engine.scheduler.requests.values())
    while any(not r.output_token_ids for r in reqs):
        engine.step()
    done = sum(len(r.output_token_ids) for r in reqs)
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    elapsed = time.perf_counter() - t0
    assert all(len(r.output_token_ids) == output_len for r in reqs)
    return (batch * output_len - done) / elapsed


def _bytes_for(model: str, dtype: str, kv_cache_dtype: str, tokens: int, block_size: int = 16) -> int:
    from tokenmill.executor.model_executor import ModelExecutor
    from tokenmill.model.loader import read_model_config

    per_block = ModelExecutor.kv_cache_bytes_per_block(read_model_config(model, dtype), block_size, dtype,
                                                       kv_cache_dtype)  # fmt: skip
    return per_block * -(-tokens // block_size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help=f"checkpoint (default: a synthetic one in {DEFAULT_MODEL_DIR})")
    p.add_argument("--shape", default="smollm-135m", help="synthetic shape when --model is not given")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-dtypes", default="auto,int8,int4")
    p.add_argument("--what", default="capacity,speed")
    p.add_argument("--kv-cache-memory", type=int, default=1 << 30, help="bytes (capacity)")
    p.add_argument("--capacity-requests", type=int, default=128)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)

    if args.model is None:
        from tokenmill.bench.synthetic_model import make_model

        model = str(make_model(DEFAULT_MODEL_DIR.parent / args.shape, args.shape))
    else:
        model = args.model
    kv_dtypes = [d for d in args.kv_dtypes.split(",") if d]
    what = set(args.what.split(","))
    print(f"model {model} ({args.dtype}); KV formats {', '.join(kv_dtypes)}")
    if "capacity" in what:
        print(f"capacity: {args.kv_cache_memory / 2**20:.0f} MiB of KV, sequences of {args.context} tokens")
        rows = [capacity(model, args.dtype, d, args.kv_cache_memory, args.context, args.capacity_requests)
                for d in kv_dtypes]  # fmt: skip
        for r in rows:
            ratio = r["seqs_at_once"] / rows[0]["seqs_at_once"]
            print(f"  {r['kv_cache_dtype']:>5}: {r['bytes_per_block']:>8} B/block, {r['num_blocks']:>6} blocks, "
                  f"{r['seqs_at_once']:>4} sequences at once ({ratio:.2f}x {rows[0]['kv_cache_dtype']})")  # fmt: skip
    if "speed" in what:
        print(f"decode speed: batch {args.batch} at {args.context} tokens of context, {args.output_len} new tokens")
        best: dict[str, float] = {}
        for rnd in range(args.repeats):
            for d in kv_dtypes if rnd % 2 == 0 else kv_dtypes[::-1]:
                tps = decode_speed(model, args.dtype, d, args.batch, args.context, args.output_len, seed=rnd)
                best[d] = max(best.get(d, 0.0), tps)
                print(f"  round {rnd}: {d:>5} {tps:8.1f} decode tokens/s", flush=True)
        for d in kv_dtypes:
            print(f"  best {d:>5}: {best[d]:8.1f} decode tokens/s ({best[d] / best[kv_dtypes[0]]:.2f}x "
                  f"{kv_dtypes[0]})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
