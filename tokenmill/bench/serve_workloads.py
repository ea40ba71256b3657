"""Workloads for ``tokenmill bench serve``: what to send, how long, and when.

- ``fixed``: every prompt ``--input-len`` tokens, every answer ``--output-len``;
- ``chat``: a chat-like mix, lengths drawn from lognormals whose medians are
  ``--input-len`` / ``--output-len`` (long tails, as in conversation traces);
- ``shared-prefix``: ``--num-prefixes`` system prompts of ``--prefix-len``
  tokens, each followed by ``--questions-per-prefix`` different questions;
  this is the workload that prefix caching and cache-aware policies change;
- ``azure``: prompt and answer lengths (and, with ``--trace-timestamps``,
  arrival times) from the Azure LLM inference trace 2023 (conversation),
  Patel et al., "Splitwise", ISCA 2024 (CC-BY 4.0).

Prompt text is made from random token ids of the server's tokenizer when one
is at hand (exact lengths), otherwise from random common words (about one
token each). Lengths are clipped so that prompt + answer fits the model's
context when the server says what it is.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from tokenmill.sim.azure_trace import read_azure_trace

WORKLOADS = ("fixed", "chat", "shared-prefix", "azure")

_WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community "
    "name president team minute idea kid body information back parent face others level office door health "
    "person art war history party result change morning reason research girl guy moment air teacher force "
    "education foot boy age policy music market sense nation plan college interest death experience effect"
).split()


@dataclass
class BenchRequest:
    prompt: str  # the user text (after the system prompt, if any)
    prompt_len: int  # intended prompt tokens (the server's count is reported)
    output_len: int
    system: str | None = None  # shared-prefix: the shared system prompt
    arrival: float | None = None  # seconds from the start (trace replay); None: from the arrival process


class PromptMaker:
    """Text of about ``n`` tokens: exact with a tokenizer, random words without."""

    def __init__(self, rng: random.Random, tokenizer: Any = None) -> None:
        self.rng = rng
        self.tokenizer = tokenizer
        self._ids: list[int] = []
        if tokenizer is not None:
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            pool = [i for i in range(len(tokenizer)) if i not in special]
            pool = rng.sample(pool, min(len(pool), 4000))
            # Keep tokens that are whole text on their own (no partial UTF-8
            # bytes, which decode to U+FFFD and re-encode as several tokens).
            self._ids = [i for i in pool if _clean(tokenizer, i)] or pool

    def text(self, n: int) -> str:
        n = max(1, n)
        if not self._ids:
            return " ".join(self.rng.choice(_WORDS) for _ in range(n))
        tok = self.tokenizer
        ids = [self.rng.choice(self._ids) for _ in range(n)]
        text = tok.decode(ids, skip_special_tokens=True)
        # Decoding and re-encoding may merge or split tokens: trim or top up
        # until the text encodes to exactly n tokens (or give up close to it).
        for _ in range(10):
            ids = tok.encode(text, add_special_tokens=False)
            if len(ids) == n:
                break
            ids = ids[:n] if len(ids) > n else ids + [self.rng.choice(self._ids) for _ in range(n - len(ids))]
            text = tok.decode(ids, skip_special_tokens=True)
        return text


def _clean(tokenizer: Any, token_id: int) -> bool:
    text = tokenizer.decode([token_id])
    return bool(text) and "\ufffd" not in text and tokenizer.encode(text, add_special_tokens=False) == [token_id]


def _clip(prompt_len: int, output_len: int, max_model_len: int | None) -> tuple[int, int]:
    prompt_len, output_len = max(1, prompt_len), max(1, output_len)
    if max_model_len is not None:
        # Room for a chat template and BOS on top of the prompt itself.
        budget = max(2, max_model_len - 16)
        output_len = min(output_len, max(1, budget // 2))
        prompt_len = min(prompt_len, budget - output_len)
    return max(1, prompt_len), output_len


def _lognormal(rng: random.Random, median: int, sigma: float, cap: int) -> int:
    return int(min(cap, max(1, round(rng.lognormvariate(math.log(max(1, median)), sigma)))))


def make_workload(args: Any, tokenizer: Any = None, max_model_len: int | None = None) -> list[BenchRequest]:
    rng = random.Random(args.seed)
    maker = PromptMaker(rng, tokenizer)
    n = args.num_prompts
    kind = args.workload
    out: list[BenchRequest] = []
    if kind == "fixed":
        for _ in range(n):
            p, o = _clip(args.input_len, args.output_len, max_model_len)
            out.append(BenchRequest(maker.text(p), p, o))
    elif kind == "chat":
        for _ in range(n):
            p = _lognormal(rng, args.input_len, args.length_sigma, 32 * args.input_len)
            o = _lognormal(rng, args.output_len, args.length_sigma, 32 * args.output_len)
            p, o = _clip(p, o, max_model_len)
            out.append(BenchRequest(maker.text(p), p, o))
    elif kind == "shared-prefix":
        prefix_len, q_len = args.prefix_len, args.input_len
        if max_model_len is not None:
            q_len, o_len = _clip(q_len, args.output_len, max_model_len // 2)
            prefix_len = min(prefix_len, max(1, max_model_len - q_len - o_len - 32))
        else:
            o_len = args.output_len
        prefixes = [maker.text(prefix_len) for _ in range(args.num_prefixes)]
        for i in range(args.num_prefixes * args.questions_per_prefix):
            system = prefixes[i % args.num_prefixes]
            out.append(BenchRequest(maker.text(q_len), prefix_len + q_len, o_len, system=system))
        rng.shuffle(out)
        out = out[:n] if n else out
    elif kind == "azure":
        rows = read_azure_trace(args.trace)  # None: the trace shipped with tokenmill
        if not rows:
            raise ValueError("the trace has no rows")
        start = rng.randrange(len(rows)) if args.trace_sample else 0
        picked = [rows[(start + i) % len(rows)] for i in range(n)]
        t0 = picked[0][0]
        for ts, p, o in picked:
            p, o = _clip(p, o, max_model_len)
            arrival = (ts - t0) / args.trace_speedup if args.trace_timestamps else None
            out.append(BenchRequest(maker.text(p), p, o, arrival=max(0.0, arrival) if arrival is not None else None))
    else:
        raise ValueError(f"unknown workload {kind!r}; choose from {', '.join(WORKLOADS)}")
    return out


def arrival_times(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Send times (seconds from start) for an open-loop process at ``rate`` requests/s.

    Inter-arrival gaps are gamma-distributed with shape ``burstiness`` and
    mean ``1/rate``: 1.0 is a Poisson process, below 1 burstier, above 1
    more regular. An infinite rate sends everything at once.
    """
    if math.isinf(rate) or rate <= 0:
        return [0.0] * n
    t, out = 0.0, []
    theta = 1.0 / (rate * burstiness)
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, theta)
    return out
