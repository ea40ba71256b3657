"""``tokenmill generate``: offline generation for one prompt or a JSONL file of prompts.

Each JSONL line is an object with ``prompt`` (a string) or ``prompt_token_ids``
(a list of token ids), plus any ``SamplingParams`` field (``max_tokens``,
``temperature``, ``logprobs``, ``min_tokens``, ``stop_token_ids``, ...) that
overrides the flags for that line. Lines are checked with the same types as
``SamplingParams`` before anything runs; an unknown field or a bad value is
refused with the file, line and field. Results are the input object plus
``outputs`` (text, token ids, finish reason and, when asked, logprobs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import IO, Any

from tokenmill.commands.options import (
    UsageError,
    add_speculative_arguments,
    check_device,
    check_model,
    check_speculative,
    positive_int,
    size_in,
)

PROMPT_FIELDS = ("prompt", "prompt_token_ids")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="generate text offline (bundled model by default)")
    p.add_argument("prompt", nargs="?", help="the prompt (or use --input)")
    p.add_argument("--model", default=None, help="local Hugging Face model directory (default: the bundled model)")
    p.add_argument("--input", help="JSONL file: one object per line with 'prompt' (or 'prompt_token_ids') and "
                                   "optional SamplingParams fields, e.g. max_tokens, logprobs, stop_token_ids")  # fmt: skip
    p.add_argument("--output", help="JSONL file for the results (default: stdout)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n", type=positive_int, default=1)
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--kv-cache-memory", type=size_in(1), default=256 << 20,
                   help="KV cache size, bytes or e.g. 64MiB, 1GiB (default 256MiB)")  # fmt: skip
    p.add_argument("--expert-cache-memory", type=size_in(1), default=None,
                   help="MoE models: RAM for experts, e.g. 8GiB; the rest memory-mapped (default: all)")
    p.add_argument("--max-num-seqs", type=positive_int, default=64)
    add_speculative_arguments(p)
    p.set_defaults(func=run)


def sampling_fields() -> list[str]:
    from tokenmill.core.request import SamplingParams

    return [f.name for f in dataclasses.fields(SamplingParams)]


def run(args: argparse.Namespace) -> int:
    from tokenmill.llm import LLM

    defaults: dict[str, Any] = dict(
        n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, max_tokens=args.max_tokens, stop=args.stop,
    )  # fmt: skip
    sink: IO[str] | None = None
    try:
        if args.input:
            lines = read_jsonl(args.input)
            records = [rec for _, rec in lines]
            where = [f"{args.input}:{lineno}" for lineno, _ in lines]
        elif args.prompt is not None:
            records, where = [{"prompt": args.prompt}], [""]
        else:
            raise UsageError("give a prompt or --input FILE")
        params = [sampling_params(defaults, r, w) for r, w in zip(records, where, strict=True)]
        if args.chat and any("prompt" not in r for r in records):
            raise UsageError("--chat needs a 'prompt' string on every line")
        from tokenmill.engine import resolve_model_path

        path = resolve_model_path(args.model)
        model_config = check_model(path, args.dtype)
        device = check_device(args.device, model_config.dtype)
        speculative = check_speculative(args, model_config)
        if args.output:
            # Opened before the model runs, so that a bad path costs nothing.
            sink = open(args.output, "w", encoding="utf-8")
        llm = LLM(path, dtype=args.dtype, device=device, kv_cache_memory=args.kv_cache_memory,
                  max_num_seqs=args.max_num_seqs, expert_cache_memory=args.expert_cache_memory,
                  **speculative)  # fmt: skip
        tok = llm.get_tokenizer()
        prompts = [_prompt(tok, r, args.chat) for r in records]
        outputs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1 or bool(args.output))
    except (UsageError, ValueError, OSError, RuntimeError) as e:
        # RuntimeError: the device (e.g. out of memory); its message can run to many lines.
        print(f"error: {(str(e).strip() or type(e).__name__).splitlines()[0]}", file=sys.stderr)
        if sink is not None:
            sink.close()
        return 2
    if sink is not None:
        with sink:
            for rec, out in zip(records, outputs, strict=True):
                sink.write(json.dumps(result(rec, out)) + "\n")
        print(f"wrote {len(outputs)} results to {args.output}", file=sys.stderr)
    elif args.input:
        for rec, out in zip(records, outputs, strict=True):
            print(json.dumps(result(rec, out)))
    else:
        for o in outputs[0].outputs:
            print(args.prompt + o.text if not args.chat else o.text)
    return 0


def sampling_params(defaults: dict[str, Any], record: dict[str, Any], where: str) -> Any:
    """``SamplingParams`` for one line: the flags, overridden by the line's own fields, type-checked."""
    from pydantic import TypeAdapter, ValidationError

    from tokenmill.core.request import SamplingParams

    known = sampling_fields()
    unknown = [k for k in record if k not in known and k not in PROMPT_FIELDS]
    if unknown:
        raise UsageError(f"{where}: unknown field {unknown[0]!r} (a line takes {', '.join(PROMPT_FIELDS)} and "
                         f"the SamplingParams fields: {', '.join(known)})")  # fmt: skip
    fields = {**defaults, **{k: v for k, v in record.items() if k in known}}
    try:
        return TypeAdapter(SamplingParams).validate_python(fields)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{loc}: {msg}" if loc else msg)
        raise UsageError(f"{where}: {'; '.join(problems)}" if where else "; ".join(problems)) from None


def result(record: dict[str, Any], out: Any) -> dict[str, Any]:
    """One result line: the input object plus its outputs (and logprobs when the line asked for them)."""
    samples = []
    for o in out.outputs:
        sample: dict[str, Any] = {"text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason}
        if o.logprobs is not None:
            sample["logprobs"] = [
                [{"token_id": t, "token": lp.decoded_token, "logprob": lp.logprob, "rank": lp.rank}
                 for t, lp in step.items()]
                for step in o.logprobs
            ]  # fmt: skip
            sample["cumulative_logprob"] = o.cumulative_logprob
        samples.append(sample)
    return {**record, "outputs": samples, "num_prompt_tokens": len(out.prompt_token_ids)}


def read_jsonl(path: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each line of the file; each needs a ``prompt`` string or ``prompt_token_ids``."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{lineno}: not JSON ({e})") from None
            if not isinstance(rec, dict) or sum(k in rec for k in PROMPT_FIELDS) != 1:
                raise UsageError(f"{path}:{lineno}: each line needs a 'prompt' string or 'prompt_token_ids'")
            ids = rec.get("prompt_token_ids")
            if "prompt" in rec and not isinstance(rec["prompt"], str):
                raise UsageError(f"{path}:{lineno}: 'prompt' must be a string")
            if ids is not None and not (isinstance(ids, list) and ids and all(_is_int(t) for t in ids)):
                raise UsageError(f"{path}:{lineno}: 'prompt_token_ids' must be a non-empty list of integers")
            records.append((lineno, rec))
    if not records:
        raise UsageError(f"{path}: no prompts in the file")
    return records


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _prompt(tok: Any, record: dict[str, Any], chat: bool) -> Any:
    if "prompt_token_ids" in record:
        return {"prompt_token_ids": record["prompt_token_ids"]}
    if chat:
        return tok.apply_chat_template([{"role": "user", "content": record["prompt"]}], tokenize=False,
                                       add_generation_prompt=True)  # fmt: skip
    return record["prompt"]
