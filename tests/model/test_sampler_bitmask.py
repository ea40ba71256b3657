"""The sampler's token bitmask (structured output): on the torch path and in the fused CPU kernel."""

from __future__ import annotations

import pytest
import torch

from tokenmill.core.request import SamplingParams
from tokenmill.model import kernels
from tokenmill.model.sampler import Sampler, SamplingRow, apply_token_bitmask, unpack_token_bitmask

V = 100
WORDS = (V + 31) // 32


@pytest.fixture(params=["torch", "kernel"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "kernel" and not kernels.cpu_kernels_available():
        pytest.skip("CPU kernels could not be built here")
    return "torch" if request.param == "torch" else "auto"


def bitmask(allowed: list[list[int]]) -> torch.Tensor:
    """xgrammar's packed layout: bit t % 32 of word t // 32."""
    m = torch.zeros((len(allowed), WORDS), dtype=torch.int64)
    for r, toks in enumerate(allowed):
        for t in toks:
            m[r, t // 32] |= 1 << (t % 32)
    return m.to(torch.int32)  # wraps bit 31 to the sign bit, as xgrammar stores it


def row(constrained: bool = True, output=(), eos=(2,), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), list(output), [], eos, constrained=constrained)


def test_unpack_reads_every_bit_including_the_sign_bit() -> None:
    allowed = [[0, 31, 32, 63, 64, 99], [5]]
    bits = unpack_token_bitmask(bitmask(allowed), V)
    assert [bits[r].nonzero()[:, 0].tolist() for r in range(2)] == allowed


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_k=3), dict(top_p=0.5),
                                    dict(min_p=0.2), dict(temperature=1.2, top_k=50, top_p=0.9)])  # fmt: skip
def test_only_allowed_tokens_are_drawn(backend: str, params: dict) -> None:
    g = torch.Generator().manual_seed(0)
    n = 300
    # the allowed tokens are among the least likely: the mask, not the logits, decides
    logits = torch.randn(n, V, generator=g)
    allowed = [31, 32, 63, 97]
    logits[:, allowed] -= 6.0
    out = Sampler(backend=backend, seed=1)(logits, [row(**params)] * n, bitmask([allowed] * n))
    assert set(out.token_ids) <= set(allowed)
    assert len(set(out.token_ids)) > 1 or params.get("top_k") == 1


def test_greedy_takes_the_masked_argmax(backend: str) -> None:
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(3))
    allowed = [[1, 2, 3], [40], [0, 99], list(range(V))]
    out = Sampler(backend=backend)(logits, [row(temperature=0.0)] * 4, bitmask(allowed))
    want = [max(a, key=lambda t: float(logits[i, t])) for i, a in enumerate(allowed)]
    assert out.token_ids == want


def test_unconstrained_rows_ignore_their_mask_row(backend: str) -> None:
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(4))
    mask = bitmask([[7], [8], [9]])
    rows = [row(temperature=0.0), row(constrained=False, temperature=0.0), row(constrained=False, top_k=5)]
    out = Sampler(backend=backend, seed=0)(logits, rows, mask)
    assert out.token_ids[0] == 7
    assert out.token_ids[1] == int(logits[1].argmax())
    assert out.token_ids[2] in logits[2].topk(5).indices.tolist()


def test_kernel_and_torch_agree_on_masked_rows() -> None:
    if not kernels.cpu_kernels_available():
        pytest.skip("CPU kernels could not be built here")
    g = torch.Generator().manual_seed(9)
    n, vocab = 64, 3000
    words = (vocab + 31) // 32
    logits = torch.randn(n, vocab, generator=g) * torch.linspace(0.1, 8, n)[:, None]
    mask = torch.randint(-(2**31), 2**31 - 1, (n, words), generator=g, dtype=torch.int64).to(torch.int32)
    mask[::7] &= 0x01010101  # some sparse rows
    combos = [dict(temperature=1.0), dict(temperature=0.5, top_k=40), dict(top_p=0.8), dict(min_p=0.05),
              dict(temperature=1.3, top_k=100, top_p=0.9), dict(temperature=0.0)]  # fmt: skip
    rows = [SamplingRow(SamplingParams(**combos[i % len(combos)], seed=i), [], [], (2,), constrained=True)
            for i in range(n)]  # fmt: skip
    fast = Sampler(backend="auto")(logits, rows, mask).token_ids
    ref = Sampler(backend="torch")(logits, rows, mask).token_ids
    assert fast == ref
    bits = unpack_token_bitmask(mask, vocab)
    assert all(bool(bits[i, t]) for i, t in enumerate(fast))


def test_a_mask_that_allows_nothing_is_ignored(backend: str) -> None:
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(5))
    out = Sampler(backend=backend)(logits, [row(temperature=0.0)], bitmask([[]]))
    assert out.token_ids == [int(logits.argmax())]
    assert torch.equal(apply_token_bitmask(logits, bitmask([[]])), logits)


def test_min_tokens_gives_way_when_the_grammar_allows_only_eos(backend: str) -> None:
    logits = torch.zeros(2, V)
    logits[:, 2] = -5.0
    # row 0: the grammar has ended (only EOS); row 1: it allows EOS and token 50
    rows = [row(temperature=0.0, min_tokens=5), row(temperature=0.0, min_tokens=5)]
    out = Sampler(backend=backend)(logits, rows, bitmask([[2], [2, 50]]))
    assert out.token_ids == [2, 50]


def test_logprobs_stay_raw_for_constrained_rows(backend: str) -> None:
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(6))
    out = Sampler(backend=backend)(logits, [row(temperature=0.0, logprobs=2)], bitmask([[10, 11]]))
    lp = logits.log_softmax(-1)[0]
    tok = out.token_ids[0]
    assert tok in (10, 11)
    assert out.logprobs is not None and out.logprobs[0] is not None
    assert abs(out.logprobs[0][0] - float(lp[tok])) < 1e-5
