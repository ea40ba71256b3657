"""``tokenmill bench spec``: speculative decoding against plain decoding, in the same run.

Two parts, each interleaving its configurations repeat by repeat (A, B, A,
B, ...) so that a busy machine slows every side alike, and reporting the
median output tokens/s, the speedup over plain decoding, the acceptance
rate, the mean accepted length and the share of time spent drafting:

1. **A 135M-shaped model in fp32** (SmolLM-135M's shape, seeded random
   weights, ``bench/synthetic_model.py``): plain decoding against the int8
   self-draft (``self-int8``, draft length ``auto``), at batch 1 (where fp32
   decode is bound by memory bandwidth: the target is 1.5x) and at batch 32
   (where the step is compute bound and speculation must back off: no slower).
2. **The bundled model on KJV continuation prompts** (held-out chapters the
   model never saw): plain against the KJV draft (``draft:default``) and
   prompt lookup (``ngram``), at batch 1.

Batch 1 runs its prompts one at a time; batch ``B`` runs ``B`` at once. Greedy,
exactly ``--output-len`` tokens each (EOS ignored), the same prompts for every
configuration. ``--output FILE`` writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="smollm-135m", help="synthetic model shape for part 1 (bench/synthetic_model.py)")
    p.add_argument("--model", default=None, help="a checkpoint for part 1 instead of the synthetic one")
    p.add_argument("--batch-sizes", default="1,32", help="part 1 batch sizes")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--prompts", type=int, default=4, help="prompts per batch-1 measurement")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every configuration")
    p.add_argument("--kjv-prompts", type=int, default=6, help="part 2: KJV continuation prompts")
    p.add_argument("--kjv-output-len", type=int, default=96)
    p.add_argument("--parts", default="135m,kjv", help="which parts to run: 135m, kjv")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--output", default=None, help="write all figures as JSON here")


def _llm(model: str | None, spec: str | None, **kw: Any) -> Any:
    from tokenmill.llm import LLM

    return LLM(model, speculative=spec, **kw)


def _time(llm: Any, batches: list[list[Any]], params: Any) -> tuple[float, int]:
    start = time.perf_counter()
    n = 0
    for batch in batches:
        for out in llm.generate(batch, params):
            n += len(out.outputs[0].token_ids)
    return time.perf_counter() - start, n


def _compare(name: str, llms: dict[str, Any], batches: list[list[Any]], params: Any, repeats: int) -> dict[str, Any]:
    """Interleaved timed runs of every configuration; speculative counters over the timed runs only."""
    for llm in llms.values():  # warm-up: the kernels' first calls, the draft's first proposals
        llm.generate(batches[0][:1], type(params)(temperature=0.0, max_tokens=8, ignore_eos=True))
    before = {k: llm.engine.stats() for k, llm in llms.items()}
    rates: dict[str, list[float]] = {k: [] for k in llms}
    load = [os.getloadavg()[0]]
    for _ in range(repeats):
        for key, llm in llms.items():
            seconds, n = _time(llm, batches, params)
            rates[key].append(n / seconds)
        load.append(os.getloadavg()[0])
    row: dict[str, Any] = {"name": name, "load_average": [round(x, 2) for x in load], "configs": {}}
    base = statistics.median(rates["plain"])
    for key, llm in llms.items():
        st, b = llm.engine.stats(), before[key]
        med = statistics.median(rates[key])
        cfg: dict[str, Any] = {"tokens_per_s": med, "runs": rates[key], "speedup": med / base}
        if st.spec is not None and b.spec is not None:
            drafted = st.spec.num_draft_tokens - b.spec.num_draft_tokens
            accepted = st.spec.num_accepted_tokens - b.spec.num_accepted_tokens
            checks = st.spec.num_drafts - b.spec.num_drafts
            cfg["acceptance_rate"] = accepted / drafted if drafted else 0.0
            cfg["mean_accepted_length"] = 1 + accepted / checks if checks else 0.0
            cfg["draft_tokens_per_check"] = drafted / checks if checks else 0.0
            ex = st.execute_seconds - b.execute_seconds
            cfg["draft_time_share"] = (st.draft_seconds - b.draft_seconds) / ex if ex > 0 else 0.0
        row["configs"][key] = cfg
    return row


def _print(console: Any, row: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"{row['name']} (load average {row['load_average'][0]} -> {row['load_average'][-1]})")
    for col in ("config", "tokens/s", "speedup", "acceptance", "mean accepted len", "drafts/check", "draft time"):
        t.add_column(col, justify="right")
    for key, c in row["configs"].items():
        spec = "acceptance_rate" in c
        t.add_row(key, f"{c['tokens_per_s']:.1f}", f"{c['speedup']:.2f}x",
                  f"{c['acceptance_rate']:.1%}" if spec else "-",
                  f"{c['mean_accepted_length']:.2f}" if spec else "-",
                  f"{c['draft_tokens_per_check']:.2f}" if spec else "-",
                  f"{c['draft_time_share']:.0%}" if spec else "-")  # fmt: skip
    console.print(t)


def _kjv_prompts(n: int, tokenizer: Any, length: int = 48) -> list[list[int]]:
    """Token windows from the held-out chapters (never trained on): continue the text."""
    from tokenmill.models import HELDOUT_SAMPLE_PATH

    ids = tokenizer(HELDOUT_SAMPLE_PATH.read_text(), add_special_tokens=False)["input_ids"]
    step = max(length, (len(ids) - length) // max(1, n))
    return [ids[i : i + length] for i in range(0, step * n, step)][:n]


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from tokenmill.core.request import SamplingParams
    from tokenmill.model import kernels

    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=None if sys.stdout.isatty() else 160)
    kernels.cpu_kernels_available()
    parts = {p for p in args.parts.split(",") if p}
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}, "rows": []}
    if "135m" in parts:
        from tokenmill.bench.synthetic_model import make_model
        from tokenmill.bench.throughput import DEFAULT_CACHE

        model = args.model or str(make_model(DEFAULT_CACHE / "bench" / args.shape, args.shape))
        vocab = json.loads(open(os.path.join(model, "config.json")).read())["vocab_size"]
        rng = random.Random(0)
        batches = [int(b) for b in args.batch_sizes.split(",") if b]
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        kv = 256 << 20
        llms = {"plain": _llm(model, None, dtype="float32", kv_cache_memory=kv),
                "self-int8": _llm(model, "self-int8", dtype="float32", kv_cache_memory=kv)}  # fmt: skip
        console.print(f"part 1: {model} (fp32), self-int8 draft cost {llms['self-int8'].engine.executor.draft_cost:.2f}")
        for b in batches:
            count = args.prompts if b == 1 else b
            prompts = [[rng.randrange(1, vocab) for _ in range(args.prompt_len)] for _ in range(count)]
            groups = [[p] for p in prompts] if b == 1 else [prompts]
            row = _compare(f"{args.shape} fp32, batch {b}", llms, groups, params, args.repeats)
            row["batch"] = b
            result["rows"].append(row)
            _print(console, row)
        del llms
    if "kjv" in parts:
        llms = {"plain": _llm(None, None), "draft:default": _llm(None, "draft:default"), "ngram": _llm(None, "ngram")}
        prompts = _kjv_prompts(args.kjv_prompts, llms["plain"].get_tokenizer())
        params = SamplingParams(temperature=0.0, max_tokens=args.kjv_output_len, ignore_eos=True)
        row = _compare("bundled model, KJV continuations, batch 1", llms, [[p] for p in prompts], params, args.repeats)
        row["batch"] = 1
        result["rows"].append(row)
        _print(console, row)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
        console.print(f"wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tokenmill bench spec", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
