"""Verify draft tokens against the target: exact for greedy, distribution-preserving when sampling.

A sequence with ``k`` drafts ``d_1..d_k`` has ``k + 1`` logits rows from the
target: row ``i`` predicts the token after ``d_i`` (row 0 the one after the
sequence's last real token). Each row is sampled as plain decoding would
sample it, with the drafts before it taken as the output so far (penalties,
``min_tokens``, and the seeded stream's position all see them).

- **Deterministic drafts** (prompt lookup, a greedy draft model, any greedy
  request): the target's token at row ``i`` is drawn exactly as without
  speculation (same sampler, same uniform), and ``d_{i+1}`` is accepted while it
  equals that token; the first mismatch, or row ``k`` after ``k`` matches, gives
  the target's own token. Greedy output is therefore token-identical to plain
  decoding, and so is seeded sampling. For a draft whose distribution is a
  point mass this is the rejection rule itself: ``d`` is accepted with
  probability ``p(d)``, and otherwise the token is drawn from ``p`` without
  ``d``.
- **Sampled drafts** (a draft model at temperature > 0, which keeps its
  distribution ``q``): standard speculative rejection sampling (Leviathan et
  al. 2023; Chen et al. 2023): accept ``d_i`` with probability
  ``min(1, p(d_i) / q(d_i))``, else draw from ``max(0, p - q)`` renormalised and
  stop; ``p`` is the distribution the sampler would draw row ``i`` from
  (penalties, temperature, top-k, top-p, min-p). After ``k`` acceptances the
  bonus token is row ``k``'s plain sample. The extra uniforms come from the
  sampler's streams (``seeded_uniform`` with stream 1 for the test, 2 for the
  residual draw), so a seeded request is reproducible.

Logprobs are those of the raw logits at the tokens finally chosen, as without
speculation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenmill.core.plan import LogprobEntry
from tokenmill.model.sampler import (
    Sampler,
    SamplingRow,
    _apply_min_p,
    _inverse_cdf,
    _top_k_top_p,
)

ACCEPT_STREAM = 1
RESIDUAL_STREAM = 2
DRAFT_STREAM = 3  # a draft model sampling its proposals (``spec/draft_model.py``)


@dataclass(slots=True)
class VerifySpan:
    """One sequence's rows in the verification batch."""

    request_id: str
    first_row: int
    drafts: list[int]
    draft_probs: torch.Tensor | None = None  # [k, vocab] for sampled drafts, else None


def sampling_probs(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """``[N, vocab]``: the distribution the sampler draws each (non-greedy) row from."""
    x = logits.float()
    x = Sampler._apply_min_tokens(x, rows, copied=False)
    x = Sampler._apply_penalties(x, rows, copied=x is not logits)
    temps = torch.tensor([r.params.temperature for r in rows], dtype=x.dtype, device=x.device)
    probs = (x / temps[:, None]).softmax(dim=-1)
    vocab = probs.shape[1]
    restricted = [j for j, r in enumerate(rows) if 0 < r.params.top_k < vocab or r.params.top_p < 1.0]
    if restricted:
        probs = probs.clone()
        survivors = _top_k_top_p(probs[restricted], [rows[j] for j in restricted])
        for j, (vals, ids) in zip(restricted, survivors, strict=True):
            probs[j] = torch.zeros_like(probs[j]).scatter_(0, ids, vals)
    probs = _apply_min_p(probs, [r.params.min_p for r in rows])
    return probs / probs.sum(dim=-1, keepdim=True)


def verify(
    sampler: Sampler,
    logits: torch.Tensor,
    rows: list[SamplingRow],
    spans: list[VerifySpan],
    token_bitmask: torch.Tensor | None = None,
) -> tuple[dict[str, list[int]], dict[str, list[LogprobEntry]]]:
    """Tokens (accepted drafts, then the target's own) and their logprobs, per sequence.

    ``logits`` and ``rows`` hold ``k + 1`` rows per span, from ``first_row`` on;
    ``token_bitmask`` (one row per row) masks the rows marked ``constrained``.
    """
    out = sampler(logits, rows, token_bitmask)
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, list[LogprobEntry]] = {}
    sampled_drafts: list[VerifySpan] = []
    for span in spans:
        a, k, d = span.first_row, len(span.drafts), span.drafts
        if span.draft_probs is not None and k and not rows[a].params.greedy:
            sampled_drafts.append(span)
            continue
        j = 0
        while j < k and out.token_ids[a + j] == d[j]:
            j += 1
        tokens[span.request_id] = out.token_ids[a : a + j + 1]
        if out.logprobs is not None and out.logprobs[a] is not None:
            logprobs[span.request_id] = out.logprobs[a : a + j + 1]  # type: ignore[assignment]
    if sampled_drafts:
        done = _rejection_sample(sampler, logits, rows, sampled_drafts)
        for span, (toks, rejected) in zip(sampled_drafts, done, strict=True):
            a, k = span.first_row, len(span.drafts)
            if not rejected:  # every draft accepted: the bonus token is row k's plain sample
                toks.append(out.token_ids[a + k])
            tokens[span.request_id] = toks
            if rows[a].params.logprobs is not None:
                n = len(toks)
                logprobs[span.request_id] = Sampler._logprobs(logits[a : a + n], rows[a : a + n], toks)  # type: ignore[assignment]
    return tokens, logprobs


def _rejection_sample(
    sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow], spans: list[VerifySpan]
) -> list[tuple[list[int], bool]]:
    """Per span: the accepted drafts, then (at the first rejection) a draw from ``max(0, p - q)``;
    and whether a draft was rejected.

    All spans' draft rows are processed in one batch; only the walk along each
    span's drafts is a Python loop.
    """
    idx = [s.first_row + i for s in spans for i in range(len(s.drafts))]
    sub = [rows[i] for i in idx]
    p = sampling_probs(logits[idx], sub)
    q = torch.cat([s.draft_probs[: len(s.drafts)] for s in spans]).to(p.device, p.dtype)  # type: ignore[index]
    d = torch.tensor([t for s in spans for t in s.drafts], device=p.device)
    pd = p.gather(1, d[:, None])[:, 0].tolist()
    qd = q.gather(1, d[:, None])[:, 0].tolist()
    u_accept = sampler.uniforms(sub, p.device, ACCEPT_STREAM).tolist()
    out: list[tuple[list[int], bool]] = []
    rejected: list[tuple[int, int]] = []  # (span, row of the batch) where a draft was rejected
    r = 0
    for si, s in enumerate(spans):
        toks: list[int] = []
        for i, tok in enumerate(s.drafts):
            if qd[r + i] > 0.0 and u_accept[r + i] * qd[r + i] < pd[r + i]:
                toks.append(tok)
                continue
            rejected.append((si, r + i))
            break
        out.append((toks, len(toks) < len(s.drafts)))
        r += len(s.drafts)
    if rejected:
        at = [row for _, row in rejected]
        residual = (p[at] - q[at]).clamp_(min=0.0)
        empty = residual.sum(dim=-1) <= 0.0  # p <= q everywhere: only rounding; draw from p
        if bool(empty.any()):
            residual[empty] = p[at][empty]
        u = sampler.uniforms([sub[row] for row in at], p.device, RESIDUAL_STREAM)
        for (si, _), tok in zip(rejected, _inverse_cdf(residual, u).tolist(), strict=True):
            out[si][0].append(tok)
    return out
