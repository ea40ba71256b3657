"""Draft verification: exact for deterministic drafts, the target's distribution under rejection sampling."""

from __future__ import annotations

import torch

from tokenmill.core.request import SamplingParams
from tokenmill.model.sampler import Sampler, SamplingRow
from tokenmill.spec.verify import VerifySpan, sampling_probs, verify

# chi-square(df) 0.999 quantiles: the statistic of a correct sampler exceeds them once in 1000 runs
CHI2_999 = {3: 16.27, 5: 20.52, 7: 24.32, 15: 37.70}


def chi_square(counts: list[int], probs: list[float]) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, cells with expected count < 5 pooled."""
    n = sum(counts)
    cells: list[tuple[float, float]] = []
    pool_o = pool_e = 0.0
    for c, p in zip(counts, probs, strict=True):
        if n * p < 5:
            pool_o, pool_e = pool_o + c, pool_e + n * p
        else:
            cells.append((c, n * p))
    if pool_e > 0:
        cells.append((pool_o, pool_e))
    return sum((o - e) ** 2 / e for o, e in cells), len(cells) - 1


def test_greedy_drafts_accept_the_matching_prefix() -> None:
    logits = torch.full((4, 8), -5.0)
    for row, tok in enumerate([3, 5, 1, 7]):  # the target's argmax after each draft
        logits[row, tok] = 5.0
    rows = [SamplingRow(SamplingParams(temperature=0.0), [9] * i) for i in range(4)]
    toks, lps = verify(Sampler(), logits, rows, [VerifySpan("a", 0, [3, 5, 2])])
    assert toks == {"a": [3, 5, 1]} and lps == {}
    toks, _ = verify(Sampler(), logits, rows, [VerifySpan("a", 0, [3, 5, 1])])
    assert toks == {"a": [3, 5, 1, 7]}  # every draft accepted: the target's token after them


def test_rejection_sampling_keeps_the_target_distribution() -> None:
    torch.manual_seed(0)
    vocab, k, trials = 8, 2, 6000
    target = torch.randn(k + 1, vocab)
    draft = torch.randn(k, vocab)
    params = SamplingParams(temperature=1.0, seed=7)
    q = draft.softmax(-1)
    p = target.softmax(-1)
    gen = torch.Generator().manual_seed(1)
    rows, spans = [], []
    drafts = torch.multinomial(q, trials, replacement=True, generator=gen).T.tolist()  # [trials, k]
    for t in range(trials):  # every trial in one batch: its rows are its own seeded streams
        spans.append(VerifySpan(f"t{t}", len(rows), drafts[t], q))
        rows.extend(SamplingRow(params, drafts[t][:i], sample_index=t) for i in range(k + 1))
    toks, _ = verify(Sampler(), target.repeat(trials, 1), rows, spans)
    first = [0] * vocab
    accepted = 0
    for t in range(trials):
        out = toks[f"t{t}"]
        first[out[0]] += 1
        accepted += out[0] == drafts[t][0]
    stat, df = chi_square(first, p[0].tolist())
    assert stat < CHI2_999[df], (stat, first)
    # the first draft is accepted with probability sum(min(p, q)) (Leviathan et al.)
    expected = float(torch.minimum(p[0], q[0]).sum())
    assert abs(accepted / trials - expected) < 4 * (expected * (1 - expected) / trials) ** 0.5


def test_sampling_probs_follow_top_k_top_p_and_temperature() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    p = sampling_probs(logits, [SamplingRow(SamplingParams(temperature=0.5, top_k=3), [])])[0]
    assert p[3] == 0 and p[4] == 0 and abs(float(p.sum()) - 1) < 1e-6
    ref = (logits[0, :3] / 0.5).softmax(-1)
    assert torch.allclose(p[:3], ref, atol=1e-6)
    p = sampling_probs(logits, [SamplingRow(SamplingParams(temperature=1.0, top_p=0.5), [])])[0]
    assert p[0] == 1.0  # the most likely token alone holds half the mass
