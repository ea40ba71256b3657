"""Turn logits rows into tokens: greedy, temperature, top-k/p, min-p, penalties, seeds, logprobs.

Order per row: min_tokens (mask EOS / stop ids), repetition penalty (HF:
over prompt + output, divide positive logits, multiply negative ones),
presence / frequency penalties (OpenAI: over output tokens only), then greedy
argmax, or temperature -> top-k -> top-p -> min-p -> sample.

Sampling inverts the CDF of the surviving probabilities, in token-id order,
with one uniform draw per row. A row with a ``seed`` draws it from a
counter-based stream keyed by ``(seed, sample index, output position)`` alone
(``seeded_uniform``), so its tokens do not depend on what else is in the
batch, on sub-step boundaries, or on the run, and every distinct seed in
``[-2**63, 2**64)`` and every sample of an ``n > 1`` request has a stream of
its own. top-k / top-p work on the top
``TOP_P_CANDIDATES`` tokens (a full sort only when a nucleus is wider). Logprobs are the
log-softmax of the raw logits (before penalties and temperature). Rows that
are plain greedy cost one batched argmax.

Structured output: a constrained row comes with a token bitmask row (xgrammar's
packed int32 layout, ``tokenmill/structured``); tokens outside it are never
drawn. The fused CPU kernel applies the mask in the pass that computes the
weights; the torch path masks the logits first. ``min_tokens`` gives way to
the grammar: when the grammar allows nothing but EOS / stop ids, they stay
allowed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenmill.core.plan import LogprobEntry
from tokenmill.core.request import SamplingParams
from tokenmill.model.backend import argmax_rows, sample_rows_kernel, sampling_kernel_applies

_UNIT = 2.0**-53  # a 53-bit integer times this is a float in [0, 1), exactly


@dataclass(slots=True)
class SamplingRow:
    """One logits row to sample and the request facts that shape it."""

    params: SamplingParams
    output_token_ids: Sequence[int]  # everything generated so far, earlier sub-steps included
    prompt_token_ids: Sequence[int] = ()
    eos_token_ids: Sequence[int] = ()
    sample_index: int = 0  # which of the request's n samples: seeded samples draw their own streams
    constrained: bool = False  # its row of the token bitmask applies (structured output)

    @property
    def is_plain_greedy(self) -> bool:
        p = self.params
        return (
            not self.constrained
            and p.greedy
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


def seeded_uniform(seed: int, sample_index: int, position: int, stream: int = 0) -> float:
    """The U[0, 1) draw for the token at output ``position`` of sample ``sample_index`` of a
    request with ``seed``.

    ``stream`` > 0 names an extra draw for the same token (speculative decoding's
    acceptance test, residual draw and draft sampling, ``spec/verify.py``): it is keyed
    by one more byte, so stream 0 keeps the plain sampler's values.

    A counter-based generator: BLAKE2b of the three integers, written at fixed widths
    (so no two triples share an encoding), keeps 53 bits. Seeding a torch generator
    instead would not do: a CPU generator keeps only the low 32 bits of its seed, so
    seeds 5 and 5 + 2**32 would draw the same stream, and folding the triple into one
    64-bit seed must collide somewhere.
    """
    key = (
        seed.to_bytes(9, "little", signed=True)
        + sample_index.to_bytes(8, "little", signed=False)
        + position.to_bytes(8, "little", signed=False)
    )
    if stream:
        key += stream.to_bytes(1, "little")
    word = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return (word >> 11) * _UNIT


class Sampler:
    """Samples one token per logits row; holds the generator for unseeded rows.

    ``backend="auto"`` uses the fused CPU sampling kernel where it is loaded (fp32 rows on
    CPU); ``"torch"`` forces the torch path, which is the kernel's reference.
    """

    def __init__(
        self, device: torch.device | str = "cpu", seed: int | None = None, backend: str = "auto"
    ) -> None:
        self.device = torch.device(device)
        self.backend = backend
        self._generator = torch.Generator(device=self.device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow], token_bitmask: torch.Tensor | None = None
    ) -> SamplerOutput:
        """``logits [N, vocab]`` (any float dtype) -> one token (and maybe logprobs) per row.

        ``token_bitmask`` (int32 ``[N, ceil(vocab / 32)]``) holds the allowed tokens of the
        rows marked ``constrained``; its other rows are ignored.
        """
        logits = logits.float()
        special = [i for i, r in enumerate(rows) if not r.is_plain_greedy]
        if not special:
            return SamplerOutput(argmax_rows(logits).tolist())
        if len(special) == len(rows):
            token_list = [0] * len(rows)
            x = logits
        else:
            token_list = argmax_rows(logits).tolist()
            x = logits[special]
        special_rows = [rows[i] for i in special]
        mask = None  # the special rows' bitmask, every bit set for unconstrained ones
        if token_bitmask is not None and any(r.constrained for r in special_rows):
            mask = token_bitmask[special].to(x.device)  # indexing copies: the caller's stays as it is
            free = [j for j, r in enumerate(special_rows) if not r.constrained]
            if free:
                mask[free] = -1
        x = self._apply_min_tokens(x, special_rows, copied=x is not logits, mask=mask)
        x = self._apply_penalties(x, special_rows, copied=x is not logits)
        greedy_local = [j for j, r in enumerate(special_rows) if r.params.greedy]
        random_local = [j for j, r in enumerate(special_rows) if not r.params.greedy]
        if greedy_local:
            g = x if len(greedy_local) == len(special) else x[greedy_local]
            if mask is not None and any(special_rows[j].constrained for j in greedy_local):
                picked = self._masked_argmax(g, mask[greedy_local])
            else:
                picked = argmax_rows(g).tolist()
            for j, tok in zip(greedy_local, picked, strict=True):
                token_list[special[j]] = tok
        if random_local:
            r = x if len(random_local) == len(special) else x[random_local]
            rmask = None
            if mask is not None and any(special_rows[j].constrained for j in random_local):
                rmask = mask if len(random_local) == len(special) else mask[random_local]
            picked = self._sample(r, [special_rows[j] for j in random_local], rmask)
            for j, tok in zip(random_local, picked, strict=True):
                token_list[special[j]] = tok
        return SamplerOutput(token_list, self._logprobs(logits, rows, token_list))

    def _masked_argmax(self, x: torch.Tensor, mask: torch.Tensor) -> list[int]:
        """The argmax of each row over the tokens its bitmask row allows."""
        if self.backend != "torch" and sampling_kernel_applies(x):
            n = x.shape[0]
            zeros = [0.0] * n
            return sample_rows_kernel(x, zeros, [0] * n, [1.0] * n, zeros, torch.zeros(n), mask).tolist()
        return argmax_rows(apply_token_bitmask(x, mask)).tolist()

    @staticmethod
    def _apply_min_tokens(
        x: torch.Tensor, rows: Sequence[SamplingRow], copied: bool, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mask EOS / stop ids of rows short of ``min_tokens`` (copies x before its first edit).

        A constrained row keeps them when its grammar allows nothing else (``mask``: the
        rows' token bitmask): the grammar has ended, and only they can end the output.
        """
        vocab = x.shape[1]
        for j, row in enumerate(rows):
            p = row.params
            if len(row.output_token_ids) >= p.min_tokens:
                continue
            banned = list(p.stop_token_ids or [])
            if not p.ignore_eos:
                banned += list(row.eos_token_ids)
            banned = [t for t in banned if 0 <= t < vocab]
            if banned and row.constrained and mask is not None and not _allows_other(mask[j], banned, vocab):
                continue
            if banned:
                if not copied:
                    x, copied = x.clone(), True
                x[j, banned] = float("-inf")
        return x

    @staticmethod
    def _apply_penalties(
        x: torch.Tensor, rows: Sequence[SamplingRow], copied: bool
    ) -> torch.Tensor:
        """Repetition (HF), presence and frequency (OpenAI) penalties; touches seen tokens only."""
        for j, row in enumerate(rows):
            p = row.params
            rep = p.repetition_penalty != 1.0
            pres_freq = (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and bool(
                row.output_token_ids
            )
            if not (rep or pres_freq):
                continue
            if not copied:
                x, copied = x.clone(), True
            if rep:
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
            if pres_freq:
                out = torch.tensor(list(row.output_token_ids), dtype=torch.long, device=x.device)
                ids, counts = out.unique(return_counts=True)
                x[j, ids] -= counts.to(x.dtype) * p.frequency_penalty + p.presence_penalty
        return x

    def _sample(
        self, x: torch.Tensor, rows: Sequence[SamplingRow], mask: torch.Tensor | None = None
    ) -> list[int]:
        u = self._uniforms(rows, x.device)
        if self.backend != "torch" and sampling_kernel_applies(x):
            return sample_rows_kernel(
                x,
                [r.params.temperature for r in rows],
                [r.params.top_k for r in rows],
                [r.params.top_p for r in rows],
                [r.params.min_p for r in rows],
                u,
                mask,
            ).tolist()
        return self._sample_torch(x, rows, u, mask)

    @staticmethod
    def _sample_torch(
        x: torch.Tensor, rows: Sequence[SamplingRow], u: torch.Tensor, mask: torch.Tensor | None = None
    ) -> list[int]:
        if mask is not None:
            x = apply_token_bitmask(x, mask)
        temps = torch.tensor([r.params.temperature for r in rows], dtype=x.dtype, device=x.device)
        probs = (x / temps[:, None]).softmax(dim=-1)
        vocab = probs.shape[1]
        restricted = [
            j for j, r in enumerate(rows) if 0 < r.params.top_k < vocab or r.params.top_p < 1.0
        ]
        plain = sorted(set(range(len(rows))) - set(restricted))
        tokens = [0] * len(rows)
        if plain:
            p = _apply_min_p(probs[plain], [rows[j].params.min_p for j in plain])
            for j, tok in zip(plain, _inverse_cdf(p, u[plain]).tolist(), strict=True):
                tokens[j] = tok
        if restricted:
            survivors = _top_k_top_p(probs[restricted], [rows[j] for j in restricted])
            for j, (vals, ids) in zip(restricted, survivors, strict=True):
                # draw in token-id order, like the plain rows (and the CPU kernel)
                dense = torch.zeros_like(probs[j]).scatter_(0, ids, vals)
                dense = _apply_min_p(dense[None], [rows[j].params.min_p])
                tokens[j] = int(_inverse_cdf(dense, u[j : j + 1])[0])
        return tokens

    def _uniforms(self, rows: Sequence[SamplingRow], device: torch.device, stream: int = 0) -> torch.Tensor:
        """One U[0, 1) draw per row: seeded rows from their own (seed, position, ``stream``) generator."""
        u = torch.empty(len(rows), device=device)
        unseeded = [j for j, r in enumerate(rows) if r.params.seed is None]
        if unseeded:
            u[unseeded] = torch.rand(len(unseeded), device=device, generator=self._generator)
        seeded = [j for j, r in enumerate(rows) if r.params.seed is not None]
        if seeded:
            u[seeded] = torch.tensor(
                [
                    seeded_uniform(rows[j].params.seed, rows[j].sample_index, len(rows[j].output_token_ids), stream)  # type: ignore[arg-type]
                    for j in seeded
                ],
                dtype=u.dtype,
            ).to(device)
        return u

    uniforms = _uniforms  # public: speculative decoding draws its extra uniforms here

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


def unpack_token_bitmask(mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """Bool ``[rows, vocab]``: token t allowed where bit ``t % 32`` of word ``t // 32`` is set."""
    shifts = torch.arange(32, dtype=torch.int32, device=mask.device)
    bits = (mask.to(torch.int32)[:, :, None] >> shifts) & 1
    return bits.reshape(mask.shape[0], -1)[:, :vocab].bool()


def apply_token_bitmask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with the tokens its bitmask disallows at -inf (a copy). A row whose mask allows
    nothing is left as it is, as the CPU kernel does."""
    allowed = unpack_token_bitmask(mask, x.shape[1])
    allowed |= ~allowed.any(dim=-1, keepdim=True)
    return x.masked_fill(~allowed, float("-inf"))


def _allows_other(mask_row: torch.Tensor, banned: list[int], vocab: int) -> bool:
    """Whether a bitmask row allows some token outside ``banned``."""
    allowed = unpack_token_bitmask(mask_row[None], vocab)[0]
    allowed[banned] = False
    return bool(allowed.any())


# top-p looks first at the tokens within these factors of the row's most likely one: a
# set that already holds ``top_p`` of the mass contains the whole nucleus (every token
# outside it is less likely than every token inside), and sorting it is far cheaper than
# sorting the vocabulary. The last resort is the full sort.
TOP_P_THRESHOLDS = (1e-3, 1e-6)


def _top_k_top_p(
    probs: torch.Tensor, rows: Sequence[SamplingRow]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each row's top-k / top-p survivors as ``(probs, token ids)``, most likely first.

    top-p keeps the smallest prefix whose mass reaches ``top_p`` of the mass left after
    top-k (so the first token always survives).
    """
    vocab = probs.shape[1]
    out: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(rows)  # type: ignore[list-item]
    ks = [r.params.top_k if 0 < r.params.top_k < vocab else 0 for r in rows]
    with_k = [j for j, k in enumerate(ks) if k]
    if with_k:
        vals, ids = probs[with_k].topk(max(ks[j] for j in with_k), dim=-1, sorted=True)
        for i, j in enumerate(with_k):
            v = vals[i, : ks[j]]
            out[j] = (_nucleus(v, rows[j].params.top_p, float(v.sum())), ids[i, : ks[j]])
    only_p = [j for j, k in enumerate(ks) if not k]
    if only_p:
        sub = probs[only_p]
        peak = sub.amax(dim=-1, keepdim=True)
        masks = [sub >= peak * f for f in TOP_P_THRESHOLDS]
        for i, j in enumerate(only_p):
            top_p = rows[j].params.top_p
            for mask in masks:
                cand = mask[i].nonzero()[:, 0]
                if float(sub[i, cand].sum()) >= top_p:
                    break
            else:
                cand = torch.arange(vocab, device=probs.device)
            v, order = sub[i, cand].sort(descending=True)
            out[j] = (_nucleus(v, top_p, 1.0), cand[order])
    return out


def _nucleus(sorted_probs: torch.Tensor, top_p: float, mass: float) -> torch.Tensor:
    """Zero the tail of descending ``sorted_probs`` beyond ``top_p`` of ``mass``."""
    if top_p >= 1.0:
        return sorted_probs
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly ahead of each token
    return sorted_probs.masked_fill(before >= top_p * mass, 0.0)


def _apply_min_p(probs: torch.Tensor, min_ps: list[float]) -> torch.Tensor:
    """Zero tokens below ``min_p`` times their row's most likely token."""
    if not any(m > 0 for m in min_ps):
        return probs
    mp = torch.tensor(min_ps, dtype=probs.dtype, device=probs.device)
    threshold = probs.amax(dim=-1, keepdim=True) * mp[:, None]
    return probs.masked_fill(probs < threshold, 0.0)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Column index drawn from each row of non-negative ``weights`` with uniforms ``u``.

    The index is the number of cumulative sums at or below ``u * total``: one whose
    weight is 0 adds nothing to the sum, so it is never returned.
    """
    cdf = weights.float().cumsum(dim=-1)
    total = cdf[:, -1:]
    # strictly below the total, so some cumulative sum lies above it even after rounding
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return (cdf <= target).sum(dim=-1)
