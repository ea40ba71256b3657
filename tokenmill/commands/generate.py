"""``tokenmill generate``: offline generation for one prompt or a JSONL file of prompts.

Each JSONL line is an object with ``prompt`` (a string) or ``prompt_token_ids``
(a list of token ids), plus any ``SamplingParams`` field (``max_tokens``,
``temperature``, ``logprobs``, ``min_tokens``, ``stop_token_ids``, ...) that
overrides the flags for that line. Lines are checked with the same types as
``SamplingParams`` before anything runs; an unknown field or a bad value is
refused with the file, line and field. Results are the input object plus
``outputs`` (text, token ids, finish reason and, when asked, logprobs).

LoRA: ``--lora-modules NAME=PATH ...`` registers adapters (a bundled one by its
name alone, as ``serve`` takes them), ``--lora NAME`` runs every prompt with
one, and a JSONL line's ``lora`` (a name, or null for the base model)
overrides it for that line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import IO, Any

from tokenmill.commands.engine_args import add_engine_arguments, engine_config, engine_value
from tokenmill.commands.options import (
    UsageError,
    add_kv_eviction_flags,
    add_speculative_arguments,
    check_device,
    check_model,
    check_policy,
    check_speculative,
    kv_eviction_from_args,
    lora_module,
    positive_int,
)

PROMPT_FIELDS = ("prompt", "prompt_token_ids")
LINE_FIELDS = ("lora",)  # fields of a line that are neither its prompt nor SamplingParams


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
    p.add_argument("--lora-modules", nargs="+", action="extend", type=lora_module, default=[], metavar="NAME=PATH",
                   help="LoRA adapters (PEFT directories) to load as NAME; a bundled adapter's name alone (psalms)")
    p.add_argument("--lora", default=None, metavar="NAME",
                   help="run the prompts with this adapter (of --lora-modules; a JSONL line's 'lora' overrides it)")
    so = p.add_argument_group("structured output (one of)").add_mutually_exclusive_group()
    so.add_argument("--json-schema", metavar="SCHEMA",
                    help="the output is JSON following this schema: inline JSON, or @FILE")  # fmt: skip
    so.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    so.add_argument("--regex", help="the output matches this regular expression")
    so.add_argument("--choice", action="append", default=None, help="the output is one of these (repeatable)")
    so.add_argument("--grammar", metavar="GRAMMAR", help="the output follows this EBNF or Lark grammar: inline, or @FILE")
    add_engine_arguments(p, defaults={"device": "auto", "kv_cache_memory": 256 << 20})
    add_speculative_arguments(p)
    p.add_argument("--trace-file", help="write each request's timeline (queued, prefill chunks, decode steps, "
                                        "preemptions, first token, finish) as Chrome trace JSON, for Perfetto")
    add_kv_eviction_flags(p)
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
        spec = structured_spec(args)
        if spec is not None:
            defaults["structured_outputs"] = spec
        if args.input:
            lines = read_jsonl(args.input)
            records = [rec for _, rec in lines]
            where = [f"{args.input}:{lineno}" for lineno, _ in lines]
        elif args.prompt is not None:
            records, where = [{"prompt": args.prompt}], [""]
        else:
            raise UsageError("give a prompt or --input FILE")
        params = [sampling_params(defaults, r, w) for r, w in zip(records, where, strict=True)]
        modules = dict(args.lora_modules)
        loras = [lora_of(r, args.lora, modules, w) for r, w in zip(records, where, strict=True)]
        if args.chat and any("prompt" not in r for r in records):
            raise UsageError("--chat needs a 'prompt' string on every line")
        from tokenmill.engine import resolve_model_path

        path = resolve_model_path(args.model)
        check_policy(engine_value(args, "policy"), engine_value(args, "policy_options"))
        model_config = check_model(path, engine_value(args, "dtype"), args.max_model_len)
        device = check_device(engine_value(args, "device"), model_config.dtype)
        speculative = check_speculative(args, model_config)
        if args.output:
            # Opened before the model runs, so that a bad path costs nothing.
            sink = open(args.output, "w", encoding="utf-8")
        traced = sum(p.n for p in params) if args.trace_file else 0
        llm = LLM.from_config(engine_config(args, model=path, device=device, timeline_requests=traced,
                                            kv_eviction=kv_eviction_from_args(args), **speculative))  # fmt: skip
        for name, lora_path in modules.items():
            llm.add_lora(name, lora_path)
        tok = llm.get_tokenizer()
        prompts = [_prompt(tok, r, args.chat) for r in records]
        outputs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1 or bool(args.output), lora=loras)
        if args.trace_file:
            from tokenmill.sim.trace_file import write_trace

            write_trace(args.trace_file, [llm.engine.scheduler.timeline], {"command": "tokenmill generate"})
            print(f"timeline: {args.trace_file}", file=sys.stderr)
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


def structured_spec(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``structured_outputs`` the flags ask for (a line's own field overrides it), or None."""
    if args.json_schema is not None:
        text = _inline_or_file(args.json_schema, "--json-schema")
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--json-schema is not valid JSON: {exc}") from None
        return {"json": schema}
    if args.json_object:
        return {"json_object": True}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.choice:
        return {"choice": list(args.choice)}
    if args.grammar is not None:
        return {"grammar": _inline_or_file(args.grammar, "--grammar")}
    return None


def _inline_or_file(value: str, flag: str) -> str:
    if not value.startswith("@"):
        return value
    try:
        with open(value[1:], encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise UsageError(f"{flag}: cannot read {value[1:]}: {exc.strerror}") from None


def sampling_params(defaults: dict[str, Any], record: dict[str, Any], where: str) -> Any:
    """``SamplingParams`` for one line: the flags, overridden by the line's own fields, type-checked."""
    from pydantic import TypeAdapter, ValidationError

    from tokenmill.core.request import SamplingParams

    known = sampling_fields()
    unknown = [k for k in record if k not in known and k not in PROMPT_FIELDS + LINE_FIELDS]
    if unknown:
        raise UsageError(f"{where}: unknown field {unknown[0]!r} (a line takes {', '.join(PROMPT_FIELDS + LINE_FIELDS)}"
                         f" and the SamplingParams fields: {', '.join(known)})")  # fmt: skip
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


def lora_of(record: dict[str, Any], default: str | None, modules: dict[str, str], where: str) -> str | None:
    """The adapter a line runs with: its ``lora`` (null: the base model), else ``--lora``.

    A name must be one of ``--lora-modules`` (a bundled adapter's name is added to them),
    checked before the model loads.
    """
    from tokenmill.models import BUNDLED_ADAPTERS

    name = record["lora"] if "lora" in record else default
    if name is None:
        return None
    if not isinstance(name, str):
        raise UsageError(f"{where}: 'lora' must be an adapter's name or null")
    if name not in modules:
        if name not in BUNDLED_ADAPTERS:
            known = ", ".join([*modules, *(n for n in BUNDLED_ADAPTERS if n not in modules)])
            raise UsageError(f"{where + ': ' if where else ''}unknown LoRA adapter {name!r} (known: {known})")
        modules[name] = str(BUNDLED_ADAPTERS[name])
    return name


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
