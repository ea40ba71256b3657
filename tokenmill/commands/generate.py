"""``tokenmill generate``: offline generation for one prompt or a JSONL file of prompts."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="generate text offline (bundled model by default)")
    p.add_argument("prompt", nargs="?", help="the prompt (or use --input)")
    p.add_argument("--model", default=None, help="local Hugging Face model directory (default: the bundled model)")
    p.add_argument("--input", help="JSONL file: one object per line with 'prompt' (and optional sampling fields)")
    p.add_argument("--output", help="JSONL file for the results (default: stdout)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"])
    p.add_argument("--kv-cache-memory", type=int, default=256 << 20, help="bytes of KV cache")
    p.add_argument("--expert-cache-memory", type=int, default=None,
                   help="MoE models: bytes of RAM for experts, the rest memory-mapped (default: all)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.set_defaults(func=run)


_SAMPLING_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "stop", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "ignore_eos", "logprobs",
)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from tokenmill.core.request import SamplingParams
    from tokenmill.llm import LLM

    defaults: dict[str, Any] = dict(
        n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, max_tokens=args.max_tokens, stop=args.stop,
    )  # fmt: skip
    if args.input:
        records = _read_jsonl(args.input)
    elif args.prompt is not None:
        records = [{"prompt": args.prompt}]
    else:
        print("error: give a prompt or --input FILE", file=sys.stderr)
        return 2
    try:
        params = [SamplingParams(**{**defaults, **{k: r[k] for k in _SAMPLING_FIELDS if k in r}}) for r in records]
        llm = LLM(args.model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
                  expert_cache_memory=args.expert_cache_memory)
        tok = llm.get_tokenizer()
        prompts = [
            tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True)
            if args.chat
            else r["prompt"]
            for r in records
        ]
        outputs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1 or bool(args.output))
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for rec, out in zip(records, outputs, strict=True):
                f.write(json.dumps(_result(rec, out)) + "\n")
        print(f"wrote {len(outputs)} results to {args.output}", file=sys.stderr)
    elif args.input:
        for rec, out in zip(records, outputs, strict=True):
            print(json.dumps(_result(rec, out)))
    else:
        for o in outputs[0].outputs:
            print(args.prompt + o.text if not args.chat else o.text)
    return 0


def _result(record: dict[str, Any], out: Any) -> dict[str, Any]:
    return {
        **record,
        "outputs": [
            {"text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason} for o in out.outputs
        ],
        "num_prompt_tokens": len(out.prompt_token_ids),
    }


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{lineno}: not JSON ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise SystemExit(f"error: {path}:{lineno}: each line needs a string 'prompt'")
            records.append(rec)
    return records
