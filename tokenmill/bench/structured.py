"""``tokenmill bench structured``: what structured output costs, and that it holds.

Part 1, compile: each schema's first compile and its cached second one.

Part 2, decode speed on a 135M-shaped model (``synthetic_model.py``, random
weights): the same prompts decoded at temperature 1.0 unconstrained and under
a JSON schema, at each batch size, in alternating order, ``--repeats`` times;
decode tokens/s counts the tokens of plans that only decode, over their time
(prefill excluded). The schema (an array of at least 50 small objects:
strings, bounded integers, enums, booleans) cannot end within
``--output-len`` tokens, so both sides decode exactly as many tokens with the
same batch. Target: at most 5% slower at batch 32.

Part 3, validity on the bundled model at temperature 1.0:
``--validity-requests`` generated schemas (nested objects, bounded arrays,
enums, ranged numbers, patterned and length-bounded strings, optional
fields); every output that finishes with ``stop`` must parse and validate
with ``jsonschema``, and every regex and choice output must match.

    python -m tokenmill.bench.structured
    python -m tokenmill.bench.structured --batch-sizes 1,32 --output-len 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import time
from typing import Any

from tokenmill.bench.harness import args_record, out_dir, script_main, write_json

NAME = "structured"

# Long by construction: at least 50 items of at least ~40 characters each.
BENCH_SCHEMA: dict[str, Any] = {
    "type": "array",
    "minItems": 50,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "age", "tags", "ok"],
        "additionalProperties": False,
    },
}
REGEX = r"\d{3}-\d{4} [A-Z][a-z]{1,8}"
CHOICES = ["yes", "no", "it came to pass", "the LORD said"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF checkpoint for part 2 (default: a synthetic model of --shape)")
    p.add_argument("--shape", default="smollm-135m", help="synthetic shape when --model is not given")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each side, interleaved")
    p.add_argument("--max-decode-steps", type=int, default=8)
    p.add_argument("--compile-schemas", type=int, default=8, help="random schemas timed in part 1")
    p.add_argument("--validity-requests", type=int, default=200, help="part 3 requests per kind; 0 skips part 3")
    p.add_argument("--validity-max-tokens", type=int, default=256)
    p.add_argument("--skip-speed", action="store_true", help="skip part 2")
    p.add_argument("--step-cost", action="store_true",
                   help="part 2 as the grammar's own CPU time per step at each batch size (random logits, no model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for the JSON result (default out/bench/structured)")


def run(args: argparse.Namespace) -> int:
    load = os.getloadavg()
    print(f"# {NAME}: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    result: dict[str, Any] = {"benchmark": NAME, "args": args_record(args), "load_before": load}
    model_dir = args.model
    if not args.skip_speed:
        if model_dir is None:
            from tokenmill.bench.synthetic_model import make_model
            from tokenmill.bench.throughput import DEFAULT_CACHE

            model_dir = str(make_model(DEFAULT_CACHE / "bench" / args.shape, args.shape))
        result["compile"] = compile_times(model_dir, args)
        result["speed"] = step_cost(model_dir, args) if args.step_cost else speed(model_dir, args)
    if args.validity_requests:
        result["validity"] = validity(args)
    result["load_after"] = os.getloadavg()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in result['load_after'])}")
    d = out_dir(args, NAME)
    write_json(d / f"{NAME}.json", result)
    print(f"wrote {d / f'{NAME}.json'}")
    ok = all(v["invalid"] == 0 for v in result.get("validity", {}).values())
    return 0 if ok else 1


def compile_times(model_dir: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    from tokenmill.structured.compiler import GrammarCompiler
    from tokenmill.structured.params import StructuredOutputsParams
    from tokenmill.structured.testing import random_schema

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    start = time.perf_counter()
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id or 0])
    print(f"\n## part 1: compile (tokenizer of {len(tokenizer)} tokens read in {time.perf_counter() - start:.2f} s)")
    rng = random.Random(args.seed)
    schemas = [("bench", BENCH_SCHEMA)] + [(f"random {i}", random_schema(rng)) for i in range(args.compile_schemas)]
    rows = []
    for name, schema in schemas:
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            compiler.compiled_grammar(StructuredOutputsParams(json=schema))
            times.append(time.perf_counter() - t0)
        rows.append({"schema": name, "chars": len(json.dumps(schema)), "first_ms": 1e3 * times[0], "cached_ms": 1e3 * times[1]})
        print(f"{name:>10}: {len(json.dumps(schema)):5d} chars, first {1e3 * times[0]:8.2f} ms, cached {1e3 * times[1]:.3f} ms")
    return rows


def speed(model_dir: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from tokenmill.core.request import SamplingParams
    from tokenmill.engine import Engine, EngineConfig
    from tokenmill.structured.params import StructuredOutputsParams

    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    engine = Engine(EngineConfig(model=model_dir, kv_cache_memory=512 << 20, max_num_seqs=max(batches),
                                 max_decode_steps=args.max_decode_steps, record_steps=True,
                                 structured_disable_any_whitespace=True))  # fmt: skip
    rng = random.Random(args.seed)
    vocab = engine.vocab_size
    spec = StructuredOutputsParams(json=BENCH_SCHEMA)
    print(f"\n## part 2: decode tokens/s, {model_dir}, prompt {args.prompt_len}, output {args.output_len}, "
          f"max_decode_steps {args.max_decode_steps}")  # fmt: skip
    rows = []
    for batch in batches:
        prompts = [[rng.randrange(1, vocab) for _ in range(args.prompt_len)] for _ in range(batch)]
        plain = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True, seed=args.seed)
        json_params = SamplingParams(temperature=1.0, max_tokens=args.output_len, seed=args.seed, structured_outputs=spec)
        _decode(engine, prompts, plain, args.output_len)  # warm-up (and the grammar compiled once)
        _decode(engine, prompts, json_params, args.output_len)
        got: dict[str, list[float]] = {"unconstrained": [], "json schema": []}
        for r in range(args.repeats):
            order = [("unconstrained", plain), ("json schema", json_params)]
            for side, params in order if r % 2 == 0 else order[::-1]:
                got[side].append(_decode(engine, prompts, params, args.output_len))
        med = {k: statistics.median(v) for k, v in got.items()}
        ratio = med["json schema"] / med["unconstrained"]
        rows.append({"batch": batch, "runs": got, "median": med, "json_over_plain": ratio,
                     "slowdown_pct": 100 * (1 - ratio), "load": os.getloadavg()})  # fmt: skip
        print(f"batch {batch:3d}: unconstrained {med['unconstrained']:8.1f} tok/s, json schema "
              f"{med['json schema']:8.1f} tok/s ({100 * (1 - ratio):+.1f}% slower); runs "
              + "; ".join(f"{k} " + " ".join(f"{x:.1f}" for x in v) for k, v in got.items()))  # fmt: skip
    return rows


def step_cost(model_dir: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """CPU ms per sampling step, unconstrained vs mask fill + masked sampling + accept (one torch thread)."""
    import torch
    from transformers import AutoTokenizer

    from tokenmill.core.request import SamplingParams
    from tokenmill.model.sampler import Sampler, SamplingRow
    from tokenmill.structured.compiler import GrammarCompiler
    from tokenmill.structured.decoding import SequenceGrammar, StepMasks
    from tokenmill.structured.params import StructuredOutputsParams

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = len(tokenizer)
    compiler = GrammarCompiler(tokenizer, vocab, [tokenizer.eos_token_id or 0], disable_any_whitespace=True)
    compiled = compiler.compiled_grammar(StructuredOutputsParams(json=BENCH_SCHEMA))
    sampler = Sampler(torch.device("cpu"))
    params = SamplingParams(temperature=1.0, seed=args.seed)
    print(f"\n## part 2: grammar CPU ms per step, vocabulary {vocab}, {args.output_len} steps, one torch thread")
    rows_out = []
    for batch in [int(b) for b in args.batch_sizes.split(",") if b]:
        got: dict[str, list[float]] = {"unconstrained": [], "json schema": []}
        for r in range(args.repeats):
            for side in ("unconstrained", "json schema") if r % 2 == 0 else ("json schema", "unconstrained"):
                grammars = [SequenceGrammar(compiled, [tokenizer.eos_token_id or 0], []) for _ in range(batch)]
                masks = StepMasks(vocab)
                rows = [SamplingRow(params=params, output_token_ids=[]) for _ in range(batch)]
                gen = torch.Generator().manual_seed(r)
                logits = [torch.randn(batch, vocab, generator=gen) for _ in range(4)]
                t0 = time.process_time()
                for step in range(args.output_len):
                    if side == "json schema":
                        mask, constrained = masks.fill(grammars)
                        for row, c in zip(rows, constrained, strict=True):
                            row.constrained = c
                        masks.accept(grammars, sampler(logits[step % 4], rows, mask).token_ids)
                    else:
                        sampler(logits[step % 4], rows)
                got[side].append(1e3 * (time.process_time() - t0) / args.output_len)
        med = {k: statistics.median(v) for k, v in got.items()}
        rows_out.append({"batch": batch, "cpu_ms_per_step": got, "median": med, "load": os.getloadavg()})
        print(f"batch {batch:3d}: unconstrained {med['unconstrained']:.2f} ms, json schema {med['json schema']:.2f} ms "
              f"(+{med['json schema'] - med['unconstrained']:.2f} ms CPU per step)")  # fmt: skip
    return rows_out


def _decode(engine: Any, prompts: list[list[int]], params: Any, output_len: int) -> float:
    """Run the batch to the end; decode tokens/s over the plans that only decode."""
    engine.step_log.clear()
    for i, p in enumerate(prompts):
        engine.add_request(f"b{time.monotonic_ns()}-{i}", p, params)
    outs = []
    while engine.has_unfinished():
        outs.extend(o for o in engine.step() if o.finished)
    counts = [len(o.outputs[0].token_ids) for o in outs]
    if counts != [output_len] * len(prompts):
        raise RuntimeError(f"expected {output_len} tokens from each of {len(prompts)} requests, got {counts}")
    tokens = 0
    seconds = 0.0
    for rec in engine.step_log:
        num_steps, seqs, _ = rec.summary
        if seqs and all(s[2] == 1 and s[3] for s in seqs):  # (id, start, new tokens, samples, drafts)
            tokens += num_steps * len(seqs)
            seconds += rec.duration
    return tokens / seconds


def validity(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    import jsonschema

    from tokenmill.core.request import SamplingParams
    from tokenmill.llm import LLM
    from tokenmill.structured.params import StructuredOutputsParams
    from tokenmill.structured.testing import random_schema

    n = args.validity_requests
    print(f"\n## part 3: validity on the bundled model, temperature 1.0, {n} requests per kind")
    llm = LLM(max_num_seqs=64, kv_cache_memory=128 << 20, max_decode_steps=args.max_decode_steps)
    rng = random.Random(args.seed)
    prompt = "<|user|>\nAnswer in the form asked.<|end|>\n<|assistant|>\n"
    checker = jsonschema.FormatChecker()
    schemas = [random_schema(rng) for _ in range(n)]
    kinds: dict[str, tuple[list[Any], Any]] = {
        "json schema": ([StructuredOutputsParams(json=s, disable_any_whitespace=True) for s in schemas],
                        lambda i, text: jsonschema.validate(json.loads(text), schemas[i], format_checker=checker)),
        "regex": ([StructuredOutputsParams(regex=REGEX)] * n,
                  lambda i, text: _require(re.fullmatch(REGEX, text) is not None, text)),
        "choice": ([StructuredOutputsParams(choice=CHOICES)] * n, lambda i, text: _require(text in CHOICES, text)),
    }  # fmt: skip
    out: dict[str, dict[str, Any]] = {}
    for kind, (specs, check) in kinds.items():
        params = [SamplingParams(temperature=1.0, max_tokens=args.validity_max_tokens, seed=args.seed + i,
                                 structured_outputs=s) for i, s in enumerate(specs)]  # fmt: skip
        t0 = time.perf_counter()
        outputs = llm.generate([prompt] * n, params)
        seconds = time.perf_counter() - t0
        stopped = invalid = 0
        for i, o in enumerate(outputs):
            c = o.outputs[0]
            if c.finish_reason != "stop":
                continue
            stopped += 1
            try:
                check(i, c.text)
            except Exception as exc:  # noqa: BLE001 - any failure is an invalid output, reported
                invalid += 1
                print(f"  INVALID {kind} #{i}: {c.text[:120]!r}: {str(exc).splitlines()[0][:120]}")
        out[kind] = {"requests": n, "stopped": stopped, "length": n - stopped, "invalid": invalid, "seconds": seconds}
        print(f"{kind:>12}: {stopped}/{n} finished with stop, {invalid} invalid; {n - stopped} hit max_tokens "
              f"({args.validity_max_tokens}); {seconds:.1f} s")  # fmt: skip
    return out


def _require(ok: bool, text: str) -> None:
    if not ok:
        raise ValueError(f"no match: {text!r}")


def main(argv: list[str] | None = None) -> int:
    return script_main(NAME, __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
