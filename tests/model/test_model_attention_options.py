"""Sliding-window masking and tanh soft-capping: the torch references against brute force,
and the CPU kernel against the reference (prefill chunks, decodes, split long decodes)."""

from __future__ import annotations

import random

import pytest
import torch

from tests.model.test_model_kernels import TOL, random_batch
from tokenmill.model import kernels
from tokenmill.model.attention import (
    AttentionMetadata,
    gather_kv,
    kv_cache_shape,
    paged_attention_padded,
    paged_attention_reference,
)
from tokenmill.model.backend import CpuKernelOps


def brute_force(q, kv, meta, scale, window, softcap) -> torch.Tensor:
    """Per sequence, per query: scores over allowed keys, written out one query at a time."""
    head_dim, group = q.shape[2], q.shape[1] // kv.shape[2]
    out = torch.zeros(q.shape)
    starts = meta.query_start_loc.tolist()
    for b, length in enumerate(meta.seq_lens.tolist()):
        k, v = gather_kv(kv, meta.block_tables[b], length, head_dim)
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        n = starts[b + 1] - starts[b]
        for i in range(n):
            p = length - n + i
            lo = max(0, p - window + 1) if window else 0
            s = torch.einsum("hd,lhd->hl", q[starts[b] + i], k[lo : p + 1]) * scale
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            out[starts[b] + i] = torch.einsum("hl,lhd->hd", s.softmax(-1), v[lo : p + 1])
    return out


OPTIONS = [(0, 0.0), (5, 0.0), (0, 3.0), (16, 2.5), (1, 0.0)]


@pytest.mark.parametrize(("window", "softcap"), OPTIONS)
def test_references_equal_brute_force(window: int, softcap: float) -> None:
    rng = random.Random(window)
    torch.manual_seed(window)
    meta, _ = random_batch(rng, num_seqs=5, block_size=4, num_blocks=80, max_ctx=40, max_query=9)
    kv = torch.randn(kv_cache_shape(80, 4, 2, 8)) * 2
    q = torch.randn(int(meta.query_start_loc[-1]), 6, 8) * 2
    want = brute_force(q, kv, meta, 0.5, window, softcap)
    got = paged_attention_reference(q, kv, meta, 0.5, window, softcap)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(paged_attention_padded(q, kv, meta, 0.5, window, softcap), want, atol=1e-5, rtol=1e-5)
    if window or softcap:  # the options change the result
        assert not torch.allclose(got, paged_attention_reference(q, kv, meta, 0.5), atol=1e-3)


kernel_only = pytest.mark.skipif(
    not kernels.cpu_kernels_available(), reason="CPU kernels could not be built here"
)


@kernel_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("window", "softcap"), OPTIONS)
@pytest.mark.parametrize(("block_size", "max_query", "head_dim"), [(16, 40, 64), (5, 12, 32), (16, 1, 80)])
def test_kernel_matches_reference(
    dtype: torch.dtype, window: int, softcap: float, block_size: int, max_query: int, head_dim: int
) -> None:
    rng = random.Random(window * 7 + block_size)
    torch.manual_seed(rng.randrange(1 << 30))
    meta, _ = random_batch(
        rng, num_seqs=6, block_size=block_size, num_blocks=200, max_ctx=120, max_query=max_query
    )
    kv = (torch.randn(kv_cache_shape(200, block_size, 2, head_dim)) * 2).to(dtype)
    q = (torch.randn(int(meta.query_start_loc[-1]), 6, head_dim) * 2).to(dtype)
    got = CpuKernelOps.attention(q, kv, meta, head_dim**-0.5, window, softcap)
    want = paged_attention_reference(q, kv, meta, head_dim**-0.5, window, softcap)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@kernel_only
@pytest.mark.parametrize(("window", "ctx"), [(100, 1000), (600, 1300), (4096, 1300)])
def test_long_windowed_decodes_split_across_threads(window: int, ctx: int) -> None:
    # few long decodes are split into key ranges merged afterwards: ranges cover the window only
    block_size, kv_heads, head_dim, num_seqs = 16, 2, 64, 2
    per = (ctx + block_size - 1) // block_size
    num_blocks = num_seqs * per + 3
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(ctx))
    tables = order[: num_seqs * per].view(num_seqs, per).to(torch.int32)
    lens = [ctx, ctx - 9]
    kv = torch.randn(kv_cache_shape(num_blocks, block_size, kv_heads, head_dim)) * 3
    meta = AttentionMetadata(
        torch.arange(num_seqs + 1, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32),
        tables, torch.zeros(num_seqs, dtype=torch.long), 1, max(lens),
    )  # fmt: skip
    q = torch.randn(num_seqs, 6, head_dim) * 3
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = CpuKernelOps.attention(q, kv, meta, 0.125, window, 30.0)
    finally:
        torch.set_num_threads(threads)
    want = paged_attention_reference(q, kv, meta, 0.125, window, 30.0)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@kernel_only
def test_kernel_refuses_negative_options() -> None:
    meta = AttentionMetadata(
        torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1], dtype=torch.int32),
        torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, dtype=torch.long), 1, 1,
    )  # fmt: skip
    kv, q = torch.zeros(kv_cache_shape(1, 4, 1, 8)), torch.zeros(1, 1, 8)
    with pytest.raises(RuntimeError, match="sliding_window"):
        CpuKernelOps.attention(q, kv, meta, 1.0, -1, 0.0)
