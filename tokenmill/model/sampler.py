"""Turn logits rows into tokens: greedy, temperature, top-k/p, min-p, penalties, seeds, logprobs.

Order per row: min_tokens (mask EOS / stop ids), repetition penalty (HF:
over prompt + output, divide positive logits, multiply negative ones),
presence / frequency penalties (OpenAI: over output tokens only), then greedy
argmax, or temperature -> top-k -> top-p -> min-p -> sample.

Sampling draws ``argmax(p / E)`` with ``E ~ Exp(1)`` noise (an exact sample of
``p``). A row with a ``seed`` draws its noise from a generator seeded by
``(seed, output position)`` alone, so its tokens do not depend on what else is
in the batch, on sub-step boundaries, or on the run. Logprobs are the
log-softmax of the raw logits (before penalties and temperature). Rows that
are plain greedy cost one batched argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenmill.core.request import SamplingParams
from tokenmill.model.backend import argmax_rows

LogprobEntry = tuple[float, list[tuple[int, float]]]

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) pairs
_SEED_MOD = 2**63 - 1


@dataclass(slots=True)
class SamplingRow:
    """One logits row to sample and the request facts that shape it."""

    params: SamplingParams
    output_token_ids: Sequence[int]  # everything generated so far, earlier sub-steps included
    prompt_token_ids: Sequence[int] = ()
    eos_token_ids: Sequence[int] = ()

    @property
    def is_plain_greedy(self) -> bool:
        p = self.params
        return (
            p.greedy
            and p.logprobs is None
            and p.repetition_penalty == 1.0
            and p.presence_penalty == 0.0
            and p.frequency_penalty == 0.0
            and len(self.output_token_ids) >= p.min_tokens
        )


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[LogprobEntry | None] | None = None  # None when no row asked


def seeded_generator(seed: int, position: int, device: torch.device) -> torch.Generator:
    """The generator for the token at output ``position`` of a request with ``seed``."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * _SEED_MIX + position) % _SEED_MOD)
    return g


class Sampler:
    """Samples one token per logits row; holds the generator for unseeded rows."""

    def __init__(self, device: torch.device | str = "cpu", seed: int | None = None) -> None:
        self.device = torch.device(device)
        self._generator = torch.Generator(device=self.device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        """``logits [N, vocab]`` (any float dtype) -> one token (and maybe logprobs) per row."""
        logits = logits.float()
        tokens = argmax_rows(logits)
        special = [i for i, r in enumerate(rows) if not r.is_plain_greedy]
        if not special:
            return SamplerOutput(tokens.tolist())
        token_list = tokens.tolist()
        x = logits[special].clone()
        self._apply_min_tokens(x, [rows[i] for i in special])
        self._apply_penalties(x, [rows[i] for i in special])
        greedy_local = [j for j, i in enumerate(special) if rows[i].params.greedy]
        random_local = [j for j, i in enumerate(special) if not rows[i].params.greedy]
        if greedy_local:
            picked = argmax_rows(x[greedy_local]).tolist()
            for j, tok in zip(greedy_local, picked, strict=True):
                token_list[special[j]] = tok
        if random_local:
            picked = self._sample(x[random_local], [rows[special[j]] for j in random_local])
            for j, tok in zip(random_local, picked, strict=True):
                token_list[special[j]] = tok
        return SamplerOutput(token_list, self._logprobs(logits, rows, token_list))

    @staticmethod
    def _apply_min_tokens(x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
        vocab = x.shape[1]
        for j, row in enumerate(rows):
            p = row.params
            if len(row.output_token_ids) >= p.min_tokens:
                continue
            banned = list(p.stop_token_ids or [])
            if not p.ignore_eos:
                banned += list(row.eos_token_ids)
            banned = [t for t in banned if 0 <= t < vocab]
            if banned:
                x[j, banned] = float("-inf")

    def _apply_penalties(self, x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
        vocab = x.shape[1]
        for j, row in enumerate(rows):
            p = row.params
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(
                    [*row.prompt_token_ids, *row.output_token_ids],
                    dtype=torch.long,
                    device=x.device,
                )
                if seen.numel():
                    seen = seen.unique()
                    vals = x[j, seen]
                    x[j, seen] = torch.where(
                        vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
                    )
            if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and row.output_token_ids:
                out = torch.tensor(list(row.output_token_ids), dtype=torch.long, device=x.device)
                counts = torch.bincount(out, minlength=vocab)[:vocab].to(x.dtype)
                x[j] -= counts * p.frequency_penalty + (counts > 0).to(x.dtype) * p.presence_penalty

    def _sample(self, x: torch.Tensor, rows: Sequence[SamplingRow]) -> list[int]:
        temps = torch.tensor([r.params.temperature for r in rows], dtype=x.dtype, device=x.device)
        x = x / temps[:, None]
        x = _top_k_top_p(x, rows)
        probs = x.softmax(dim=-1)
        min_ps = [r.params.min_p for r in rows]
        if any(m > 0 for m in min_ps):
            mp = torch.tensor(min_ps, dtype=probs.dtype, device=probs.device)
            threshold = probs.amax(dim=-1, keepdim=True) * mp[:, None]
            probs = probs.masked_fill(probs < threshold, 0.0)
        noise = torch.empty_like(probs)
        unseeded = [j for j, r in enumerate(rows) if r.params.seed is None]
        if unseeded:
            noise[unseeded] = torch.empty(
                (len(unseeded), probs.shape[1]), dtype=probs.dtype, device=probs.device
            ).exponential_(generator=self._generator)
        for j, r in enumerate(rows):
            if r.params.seed is not None:
                g = seeded_generator(r.params.seed, len(r.output_token_ids), probs.device)
                noise[j].exponential_(generator=g)
        noise.clamp_(min=1e-30)  # an exact 0 would turn a masked 0-probability token into NaN
        return argmax_rows(probs / noise).tolist()

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, rows: Sequence[SamplingRow], tokens: list[int]
    ) -> list[LogprobEntry | None] | None:
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not wanted:
            return None
        lp = logits[wanted].log_softmax(dim=-1)
        top_n = max(rows[i].params.logprobs or 0 for i in wanted)
        sampled = lp.gather(1, torch.tensor([[tokens[i]] for i in wanted], device=lp.device))
        sampled_list = sampled[:, 0].tolist()
        top_vals_l: list[list[float]] = []
        top_ids_l: list[list[int]] = []
        if top_n:
            top_vals, top_ids = lp.topk(top_n, dim=-1)
            top_vals_l, top_ids_l = top_vals.tolist(), top_ids.tolist()
        result: list[LogprobEntry | None] = [None] * len(rows)
        for j, i in enumerate(wanted):
            n = rows[i].params.logprobs or 0
            top = list(zip(top_ids_l[j][:n], top_vals_l[j][:n], strict=True)) if n else []
            result[i] = (sampled_list[j], top)
        return result


def _top_k_top_p(x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p nucleus to -inf."""
    vocab = x.shape[1]
    ks = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
    ps = [r.params.top_p for r in rows]
    if all(k == vocab for k in ks) and all(p >= 1.0 for p in ps):
        return x
    sorted_x, order = x.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=x.device)[None, :]
    k_t = torch.tensor(ks, device=x.device)[:, None]
    sorted_x = sorted_x.masked_fill(rank >= k_t, float("-inf"))
    if any(p < 1.0 for p in ps):
        p_t = torch.tensor(ps, dtype=x.dtype, device=x.device)[:, None]
        probs = sorted_x.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly ahead of each token
        # keep the smallest prefix whose mass reaches top_p (always the first token)
        sorted_x = sorted_x.masked_fill(before >= p_t, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, sorted_x)
