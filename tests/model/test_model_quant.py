"""int8 weight-only quantization: the quantizer, both int8 GEMMs, and greedy parity with transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenmill.model import kernels, load_model
from tokenmill.model.backend import CpuKernelOps, TorchOps
from tokenmill.model.quant import QMAX, dequantize, quantize_per_channel_int8
from tokenmill.model.testing import load_hf_model, make_tiny_checkpoint

from .test_model_llama import run_chunks

needs_avx512 = pytest.mark.skipif(
    not kernels.has_avx512(), reason="the packed CPU GEMM needs the AVX-512 CPU kernels"
)


def test_quantizer_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    # rows of very different magnitudes, one all-zero row, one with a single large outlier
    w = torch.randn(40, 70, generator=g) * torch.logspace(-3, 1, 40)[:, None]
    w[5] = 0.0
    w[7, 3] = 50.0
    q, scale = quantize_per_channel_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (40,)
    amax = w.abs().amax(dim=1)
    nonzero = amax > 0
    # one scale per output channel, just enough for its largest |w| (rounded up to bf16)
    assert (scale[nonzero] >= amax[nonzero] / QMAX).all()
    assert (scale[nonzero] <= amax[nonzero] / QMAX * 1.02).all()
    assert torch.equal(scale, scale.bfloat16().float())
    assert q.abs().max() <= QMAX
    err = (dequantize(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-6)).all()
    assert (q[5] == 0).all()


def _case(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.1
    x = torch.randn(m, k, generator=g).to(dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype) if bias else None
    return x, w, b


# tight: the only differences to the fp32 reference are summation order and the output's rounding
GEMM_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=1e-3, rtol=8e-3)}
SHAPES = [(1, 37, 64), (3, 200, 130), (7, 48, 576), (32, 1000, 96), (100, 17, 33)]


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_int8_packed_gemm_matches_dequantized_reference(
    dtype: torch.dtype, m: int, n: int, k: int
) -> None:
    x, w, b = _case(m, n, k, dtype, bias=n % 2 == 0, seed=m * n + k)
    ops = CpuKernelOps(use_packed_gemm=True)
    lin = ops.prepare_linear(w, b, "int8")
    assert lin.packed is not None and lin.packed.dtype == torch.int8 and lin.weight is None
    q, scale = quantize_per_channel_int8(w)
    want = x.float() @ dequantize(q, scale).T + (b.float() if b is not None else 0.0)
    got = ops.linear(x, lin)
    assert got.dtype == dtype and got.shape == (m, n)
    torch.testing.assert_close(got.float(), want, **GEMM_TOL[dtype])
    # unpacking gives back the dequantized weight exactly
    torch.testing.assert_close(lin.dense_weight(), dequantize(q, scale), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 48, 64), (9, 200, 128), (32, 64, 576)])
def test_int8_torch_gemm_matches_dequantized_reference(
    dtype: torch.dtype, m: int, n: int, k: int
) -> None:
    x, w, b = _case(m, n, k, dtype, bias=True, seed=m + n + k)
    lin = TorchOps.prepare_linear(w, b, "int8")
    q, scale = quantize_per_channel_int8(w)
    want = x.float() @ dequantize(q, scale).T + b.float()
    torch.testing.assert_close(TorchOps.linear(x, lin).float(), want, **GEMM_TOL[dtype])


# logits of the tiny checkpoint are O(5); int8 weights and bf16 activations move them by <= ~0.2
TOP2_TOL = 0.5


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("quant") / "llama", "llama", seed=11)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_int8_greedy_parity_with_transformers(tiny_llama: Path, backend: str) -> None:
    """Greedy parity of the int8 model against transformers in fp32, allowing near-ties.

    The sequence is the fp32 reference's own greedy continuation of a random
    prompt. tokenmill (int8 weights, bf16 activations) then runs over it
    teacher-forced, step by step: the prompt as one prefill chunk, then one
    token per step (the decode path, one-row GEMMs). At every position either
    its argmax equals the reference's, or the reference's top-2 logit gap is
    below ``TOP2_TOL`` (a near-tie that 8-bit weights may flip).
    """
    hf = load_hf_model(tiny_llama)
    prompt = torch.randint(0, 250, (8,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        seq = hf.generate(prompt[None], max_new_tokens=24, do_sample=False, pad_token_id=0)[0]
        ref = hf(seq[None]).logits[0]
    model, cfg = load_model(tiny_llama, dtype="int8")
    assert cfg.quantization == "int8" and model.dtype == torch.bfloat16
    model.set_backend(backend)
    got = run_chunks(model, seq, [len(prompt)] + [1] * (len(seq) - len(prompt)))
    top2 = ref.topk(2, dim=-1).values
    gap = top2[:, 0] - top2[:, 1]
    agree = got.argmax(-1) == ref.argmax(-1)
    assert (agree | (gap < TOP2_TOL)).all(), f"disagree where gap={gap[~agree].tolist()}"
    assert agree.float().mean() > 0.8
    # and the logits themselves are close (8-bit weights, bf16 activations)
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()
