"""The sampler: greedy, seeds, top-k / top-p / min-p masks, penalties, min_tokens, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmill.core.request import SamplingParams
from tokenmill.model import kernels
from tokenmill.model.sampler import Sampler, SamplingRow

BACKEND = "auto"


@pytest.fixture(autouse=True, params=["torch", "kernel"])
def sampler_backend(request: pytest.FixtureRequest):
    """Run every test on the torch path and on the fused CPU kernel."""
    global BACKEND
    if request.param == "kernel" and not kernels.cpu_kernels_available():
        pytest.skip("CPU kernels could not be built here")
    BACKEND = "torch" if request.param == "torch" else "auto"
    yield
    BACKEND = "auto"


V = 50


def row(output=(), prompt=(), eos=(2,), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), list(output), list(prompt), eos)


def sample_many(logits: torch.Tensor, r: SamplingRow, n: int = 400) -> set[int]:
    sampler = Sampler(backend=BACKEND, seed=0)
    out = sampler(logits.expand(n, -1).contiguous(), [r] * n)
    return set(out.token_ids)


def test_greedy_is_argmax_and_cheap_path_has_no_logprobs() -> None:
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(0))
    out = Sampler(backend=BACKEND)(logits, [row(temperature=0.0)] * 3 + [row(top_k=1)] * 3)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.randn(V, generator=g)
    seeded = row(temperature=1.0, seed=42, output=[1, 2, 3])
    alone = Sampler(backend=BACKEND, seed=1)(target[None], [seeded]).token_ids[0]
    for trial in range(5):
        others = torch.randn(7, V, generator=g)
        batch = torch.cat([others[:trial], target[None], others[trial:]])
        rows = (
            [row(temperature=1.0)] * trial
            + [seeded]
            + [row(temperature=0.7, seed=trial)] * (7 - trial)
        )
        assert Sampler(backend=BACKEND, seed=100 + trial)(batch, rows).token_ids[trial] == alone
    # the draw moves with the output position, so a seeded request does not repeat itself
    draws = {
        Sampler(backend=BACKEND)(
            target[None], [row(temperature=1.0, seed=42, output=[0] * k)]
        ).token_ids[0]
        for k in range(30)
    }
    assert len(draws) > 3


def test_seeded_sampling_follows_the_distribution() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    probs = logits.softmax(-1)
    counts = torch.zeros(4)
    sampler = Sampler(backend=BACKEND)
    for pos in range(2000):
        counts[
            sampler(logits[None], [row(temperature=1.0, seed=7, output=[0] * pos)]).token_ids[0]
        ] += 1
    assert torch.allclose(counts / counts.sum(), probs, atol=0.04)


def test_top_k_top_p_min_p_masks() -> None:
    logits = torch.log(torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.05]))
    assert sample_many(logits, row(top_k=2)) == {0, 1}
    # nucleus: 0.4 + 0.25 = 0.65 < 0.7, so the third token is needed, the fourth is not
    assert sample_many(logits, row(top_p=0.7)) == {0, 1, 2}
    assert sample_many(logits, row(top_p=0.65)) == {0, 1}
    assert sample_many(logits, row(top_p=0.01)) == {0}
    # min_p: keep tokens with p >= 0.3 * 0.4 = 0.12
    assert sample_many(logits, row(min_p=0.3)) == {0, 1, 2}
    # after top-k the kept mass renormalises: 0.5, 0.3125, 0.1875
    assert sample_many(logits, row(top_k=3, top_p=0.5)) == {0}
    assert sample_many(logits, row(top_k=3, top_p=0.6)) == {0, 1}
    # temperature sharpens: at 0.05 only the top token survives in practice
    assert sample_many(logits, row(temperature=0.05)) == {0}


def test_repetition_penalty_hf_semantics() -> None:
    logits = torch.tensor([[3.0, 2.9, -1.0, -1.1] + [-10.0] * (V - 4)])
    # token 0 (positive, seen in the prompt) is divided: 3.0 / 2 = 1.5 < 2.9
    assert Sampler(backend=BACKEND)(
        logits, [row(prompt=[0], temperature=0.0, repetition_penalty=2.0)]
    ).token_ids == [1]
    # a negative logit is multiplied: -1.0 * 2 < -1.1, so token 3 wins over 2
    masked = logits.clone()
    masked[0, :2] = -100.0
    out = Sampler(backend=BACKEND)(
        masked, [row(output=[2], temperature=0.0, repetition_penalty=2.0)]
    )
    assert out.token_ids == [3]


def test_presence_and_frequency_penalties_openai_semantics() -> None:
    logits = torch.zeros(1, V)
    logits[0, :3] = torch.tensor([5.0, 4.5, 4.0])
    # token 0 generated three times: 5 - 3 * 0.3 = 4.1 < 4.5
    out = Sampler(backend=BACKEND)(
        logits, [row(output=[0, 0, 0], temperature=0.0, frequency_penalty=0.3)]
    )
    assert out.token_ids == [1]
    # presence counts once: 5 - 0.4 = 4.6 > 4.5 still wins; 5 - 0.6 = 4.4 does not
    assert Sampler(backend=BACKEND)(
        logits, [row(output=[0, 0, 0], temperature=0.0, presence_penalty=0.4)]
    ).token_ids == [0]
    assert Sampler(backend=BACKEND)(
        logits, [row(output=[0, 0], temperature=0.0, presence_penalty=0.6)]
    ).token_ids == [1]
    # prompt tokens do not count for presence / frequency
    assert Sampler(backend=BACKEND)(
        logits, [row(prompt=[0] * 9, temperature=0.0, presence_penalty=2.0)]
    ).token_ids == [0]


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.zeros(1, V)
    logits[0, 2] = 9.0  # EOS
    logits[0, 5] = 8.0  # a stop token id
    logits[0, 7] = 7.0
    r = row(output=[1], eos=(2,), temperature=0.0, min_tokens=3, stop_token_ids=[5])
    assert Sampler(backend=BACKEND)(logits, [r]).token_ids == [7]
    done = row(output=[1, 1, 1], eos=(2,), temperature=0.0, min_tokens=3, stop_token_ids=[5])
    assert Sampler(backend=BACKEND)(logits, [done]).token_ids == [2]
    # with ignore_eos the EOS id is not a stop, so min_tokens leaves it alone
    free = row(output=[1], eos=(2,), temperature=0.0, min_tokens=3, ignore_eos=True)
    assert Sampler(backend=BACKEND)(logits, [free]).token_ids == [2]


def test_logprobs_are_raw_log_softmax_with_top_n() -> None:
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(3))
    rows = [
        row(temperature=0.0, logprobs=3, repetition_penalty=1.5, prompt=[int(logits[0].argmax())]),
        row(temperature=0.0),
        row(temperature=1.0, seed=1, logprobs=0),
    ]
    out = Sampler(backend=BACKEND)(logits, rows)
    assert out.logprobs is not None and out.logprobs[1] is None
    ref = logits.log_softmax(-1)
    lp0, top0 = out.logprobs[0]
    assert math.isclose(lp0, ref[0, out.token_ids[0]].item(), rel_tol=1e-5)
    assert [t for t, _ in top0] == ref[0].topk(3).indices.tolist()
    for t, v in top0:
        assert math.isclose(v, ref[0, t].item(), rel_tol=1e-5)
    # the penalty changed the choice, the logprobs still come from the raw logits
    assert out.token_ids[0] != int(logits[0].argmax())
    lp2, top2 = out.logprobs[2]
    assert top2 == [] and math.isclose(lp2, ref[2, out.token_ids[2]].item(), rel_tol=1e-5)


def test_top_p_candidates_equal_a_full_sort() -> None:
    from tokenmill.model import sampler as sampler_mod

    g = torch.Generator().manual_seed(4)
    vocab = 300
    # peaked rows (the nucleus is in the first candidate set) and flat rows (full sort)
    logits = torch.cat(
        [torch.randn(4, vocab, generator=g) * 6, torch.randn(4, vocab, generator=g) * 0.01]
    )
    probs = logits.softmax(-1)
    rows = [row(top_p=0.9), row(top_k=5, top_p=0.8), row(top_k=20), row(top_p=0.5)] * 2

    def brute(p: torch.Tensor, r: SamplingRow) -> torch.Tensor:
        k = r.params.top_k or vocab
        v, ids = p.sort(descending=True)
        v = v.masked_fill(torch.arange(vocab) >= k, 0.0)
        before = v.cumsum(-1) - v
        v = v.masked_fill(before >= r.params.top_p * v.sum(), 0.0)
        return torch.zeros(vocab).scatter_(0, ids, v)

    got = sampler_mod._top_k_top_p(probs, rows)
    for i, (vals, ids) in enumerate(got):
        dense = torch.zeros(vocab).scatter_(0, ids, vals)
        torch.testing.assert_close(dense, brute(probs[i], rows[i]))
    sizes = [int((vals > 0).sum()) for vals, _ in got]
    assert sizes[4] > 200 and sizes[7] > 100  # flat rows: nuclei wider than the candidates
    assert sizes[1] <= 5 and sizes[2] == 20 and sizes[5] <= 5


def _seeded_stream(seed: int, sample_index: int = 0, length: int = 32) -> list[int]:
    """The tokens a seeded row draws from flat logits at output positions 0..length-1."""
    logits = torch.zeros(1, V)
    sampler = Sampler(backend=BACKEND)
    extra = {"sample_index": sample_index} if sample_index else {}
    return [
        sampler(logits, [SamplingRow(SamplingParams(temperature=1.0, seed=seed), [0] * pos, **extra)]).token_ids[0]
        for pos in range(length)
    ]


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (0, 2**63 - 1),  # equal modulo 2**63 - 1
        (-1, -(2**63)),  # equal modulo 2**63 - 1
        (5, 5 + 2**32),  # equal in their low 32 bits (all a CPU torch generator keeps)
        (-1, 2**64 - 1),  # equal as 64-bit patterns: still distinct integers
    ],
)
def test_distinct_seeds_draw_distinct_streams(a: int, b: int) -> None:
    assert _seeded_stream(a) != _seeded_stream(b)
    assert _seeded_stream(a) == _seeded_stream(a)  # and each stays reproducible


def test_samples_of_one_seed_draw_their_own_streams() -> None:
    # sample i of seed s is not sample 0 of seed s + i (no arithmetic on the seed to collide or overflow)
    assert _seeded_stream(7, sample_index=1) != _seeded_stream(8, sample_index=0)
    assert _seeded_stream(2**63 - 1, sample_index=1) != _seeded_stream(2**63 - 1, sample_index=0)
    assert len({tuple(_seeded_stream(3, sample_index=i)) for i in range(4)}) == 4


def test_seed_outside_64_bits_is_refused() -> None:
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="seed"):
            SamplingParams(seed=bad)
    SamplingParams(seed=2**64 - 1)
    SamplingParams(seed=-(2**63))
