"""The compiled CPU kernels against the torch reference ops (attention, RoPE+KV write, norms, GEMM)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from tokenmill.model import kernels
from tokenmill.model.attention import (
    AttentionMetadata,
    kv_cache_shape,
    paged_attention_reference,
)
from tokenmill.model.backend import CpuKernelOps, TorchOps
from tokenmill.model.config import RopeConfig
from tokenmill.model.rope import cos_sin_cache

pytestmark = pytest.mark.skipif(
    not kernels.cpu_kernels_available(), reason="CPU kernels could not be built here"
)

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@contextmanager
def kernel_threads(n: int) -> Iterator[None]:
    """Run the kernels' parallel regions on exactly ``n`` threads (no limit left from a model run)."""
    threads, limit = torch.get_num_threads(), kernels.set_thread_limit(0)
    torch.set_num_threads(n)
    try:
        assert kernels.kernel_threads() == n
        yield
    finally:
        torch.set_num_threads(threads)
        kernels.set_thread_limit(limit)


def random_batch(
    rng: random.Random,
    *,
    num_seqs: int,
    block_size: int,
    num_blocks: int,
    max_ctx: int,
    max_query: int,
) -> tuple[AttentionMetadata, list[tuple[int, int]]]:
    """Sequences with random context lengths and query chunks over shuffled, disjoint blocks."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    seqs, tables = [], []
    for _ in range(num_seqs):
        ctx = rng.randint(1, max_ctx)
        n_query = rng.randint(1, min(ctx, max_query))
        seqs.append((ctx, n_query))
        tables.append([free.pop() for _ in range((ctx + block_size - 1) // block_size)])
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    starts = [0]
    for _, n in seqs:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor([c for c, _ in seqs], dtype=torch.int32),
        block_tables=block_tables,
        slot_mapping=torch.zeros(starts[-1], dtype=torch.long),  # unused by attention
        max_query_len=max(n for _, n in seqs),
        max_seq_len=max(c for c, _ in seqs),
    )
    return meta, seqs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("num_heads", "kv_heads", "head_dim", "block_size", "max_query"),
    [
        (4, 4, 64, 16, 1),  # decode, MHA
        (8, 2, 64, 16, 1),  # decode, GQA
        (9, 3, 64, 16, 40),  # prefill chunks with cached context before them
        (4, 1, 80, 8, 24),  # head_dim not a multiple of 16, small blocks
        (6, 2, 32, 5, 12),  # block size that is not a multiple of the key chunk
    ],
)
def test_paged_attention_matches_reference(
    dtype: torch.dtype,
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    max_query: int,
) -> None:
    rng = random.Random(num_heads * 1000 + head_dim + block_size)
    torch.manual_seed(rng.randrange(1 << 30))
    num_blocks = 200
    meta, _ = random_batch(
        rng, num_seqs=7, block_size=block_size, num_blocks=num_blocks, max_ctx=150,
        max_query=max_query,
    )  # fmt: skip
    kv = torch.randn(kv_cache_shape(num_blocks, block_size, kv_heads, head_dim)).to(dtype)
    total = int(meta.query_start_loc[-1])
    # q as a strided view into a wider fused qkv buffer, the way the model passes it
    qkv = torch.randn(total, (num_heads + 2 * kv_heads) * head_dim).to(dtype)
    q = qkv[:, : num_heads * head_dim].view(total, num_heads, head_dim)
    scale = head_dim**-0.5
    got = CpuKernelOps.attention(q, kv, meta, scale)
    want = paged_attention_reference(q, kv, meta, scale)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_seqs", "ctx"), [(1, 1000), (2, 1300), (1, 300)])
def test_paged_attention_long_decodes_split_across_threads(
    dtype: torch.dtype, num_seqs: int, ctx: int
) -> None:
    # few long decodes: with 2 threads the kernel splits each context and merges the parts
    block_size, kv_heads, head_dim = 16, 2, 64
    per = (ctx + block_size - 1) // block_size
    num_blocks = num_seqs * per + 3
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(ctx))
    tables = order[: num_seqs * per].view(num_seqs, per).to(torch.int32)
    lens = [ctx - 7 * b for b in range(num_seqs)]
    kv = (torch.randn(kv_cache_shape(num_blocks, block_size, kv_heads, head_dim)) * 3).to(dtype)
    meta = AttentionMetadata(
        torch.arange(num_seqs + 1, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32),
        tables, torch.zeros(num_seqs, dtype=torch.long), 1, max(lens),
    )  # fmt: skip
    q = (torch.randn(num_seqs, 6, head_dim) * 3).to(dtype)
    with kernel_threads(2):
        got = CpuKernelOps.attention(q, kv, meta, 0.125)
    want = paged_attention_reference(q, kv, meta, 0.125)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_write_kv_matches_reference(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    heads, kv_heads, head_dim, block_size, num_blocks, t = 6, 2, 64, 16, 12, 37
    cos_sin = cos_sin_cache(RopeConfig(theta=10000.0), head_dim, 512)
    positions = torch.randint(0, 512, (t,))
    slots = torch.randperm(num_blocks * block_size)[:t]
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim).to(dtype)
    kv_a = torch.zeros(kv_cache_shape(num_blocks, block_size, kv_heads, head_dim), dtype=dtype)
    kv_b = kv_a.clone()
    qkv_a, qkv_b = qkv.clone(), qkv.clone()
    TorchOps.rope_write_kv(qkv_a, positions, cos_sin, kv_a, slots, heads, kv_heads)
    CpuKernelOps.rope_write_kv(qkv_b, positions, cos_sin, kv_b, slots, heads, kv_heads)
    torch.testing.assert_close(qkv_b.float(), qkv_a.float(), **TOL[dtype])
    torch.testing.assert_close(kv_b.float(), kv_a.float(), **TOL[dtype])
    assert kv_b.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_and_silu_match_reference(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    x = torch.randn(5, 576).to(dtype)
    w = (1 + 0.1 * torch.randn(576)).to(dtype)
    torch.testing.assert_close(
        CpuKernelOps.rms_norm(x, w, 1e-6).float(),
        TorchOps.rms_norm(x, w, 1e-6).float(),
        **TOL[dtype],
    )
    h = torch.randn(5, 576).to(dtype)
    res_a, res_b = x.clone(), x.clone()
    out_a = TorchOps.add_rms_norm(h, res_a, w, 1e-6)
    out_b = CpuKernelOps.add_rms_norm(h, res_b, w, 1e-6)
    torch.testing.assert_close(res_b.float(), res_a.float(), **TOL[dtype])
    torch.testing.assert_close(out_b.float(), out_a.float(), **TOL[dtype])
    gu = (torch.randn(5, 2 * 1000) * 4).to(dtype)
    torch.testing.assert_close(
        CpuKernelOps.silu_mul(gu).float(), TorchOps.silu_mul(gu).float(), **TOL[dtype]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 33, 200])
@pytest.mark.parametrize(("n", "k", "bias"), [(576, 576, False), (195, 100, True), (1, 17, True)])
def test_packed_gemm_matches_linear(
    dtype: torch.dtype, rows: int, n: int, k: int, bias: bool
) -> None:
    if not kernels.has_avx512():
        pytest.skip("the packed GEMM is only used with AVX-512")
    torch.manual_seed(rows * n + k)
    x = torch.randn(rows, k).to(dtype)
    w = torch.randn(n, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    ops = CpuKernelOps(use_packed_gemm=True)
    lin = ops.prepare_linear(w, b)
    assert lin.weight is None and lin.packed is not None
    # bf16 with an even k uses the AVX-512-BF16 k-pair panels where the CPU has them
    pairs = dtype == torch.bfloat16 and k % 2 == 0 and "avx512_bf16" in kernels._cpu_flags()
    assert lin.packed.shape[-1] == (32 if pairs else 16)
    assert torch.equal(lin.dense_weight(), w)  # the panel layout unpacks losslessly
    got = ops.linear(x, lin)
    want = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.25, rtol=2e-2)
    torch.testing.assert_close(got.float(), want, **tol)


@pytest.mark.parametrize("quant", [None, "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 13, 40, 200])
def test_fused_silu_gate_gemm_matches_gemm_then_silu_mul(
    dtype: torch.dtype, rows: int, quant: str | None
) -> None:
    if not kernels.has_avx512():
        pytest.skip("the packed GEMM is only used with AVX-512")
    torch.manual_seed(rows)
    inter, k = 96, 40  # 6 gate/up panel pairs: tasks of 4 and of 2 panels both occur
    x = torch.randn(rows, k).to(dtype)
    w = (torch.randn(2 * inter, k) / 4).to(dtype)
    b = torch.randn(2 * inter).to(dtype)
    ops = CpuKernelOps(use_packed_gemm=True)
    fused = ops.prepare_gate_up(w, b, quant)
    plain = ops.prepare_linear(w, b, quant)
    assert fused.silu_gate and not plain.silu_gate
    # the interleaved layout unpacks to the checkpoint's order
    torch.testing.assert_close(fused.dense_weight(), plain.dense_weight(), rtol=0, atol=0)
    assert torch.equal(fused.dense_bias(), b)
    got = ops.gate_up_silu(x, fused)
    assert got.shape == (rows, inter) and got.dtype == dtype
    want = ops.silu_mul(ops.linear(x, plain))  # the unfused kernels, same roundings
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)


def test_fused_silu_gate_falls_back_where_panels_do_not_pair() -> None:
    if not kernels.has_avx512():
        pytest.skip("the packed GEMM is only used with AVX-512")
    torch.manual_seed(0)
    inter, k = 24, 32  # 48 rows: 3 panels, so gate and up panels cannot pair up
    x, w = torch.randn(3, k), torch.randn(2 * inter, k)
    ops = CpuKernelOps(use_packed_gemm=True)
    lin = ops.prepare_gate_up(w)
    assert not lin.silu_gate
    want = TorchOps.silu_mul(torch.nn.functional.linear(x, w))
    torch.testing.assert_close(ops.gate_up_silu(x, lin), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.tokenmill.packed_linear(x, lin.packed, 2 * inter, None, True)


def test_argmax_rows_matches_torch_including_ties() -> None:
    torch.manual_seed(2)
    for shape in [(1, 7), (3, 16), (5, 1000), (32, 4099)]:
        x = torch.randn(shape)
        assert torch.equal(torch.ops.tokenmill.argmax_rows(x), x.argmax(-1))
    ties = torch.zeros(2, 100)
    ties[0, [5, 40, 70]] = 3.0  # first occurrence wins, in the vector lanes and the tail
    ties[1, [97, 99]] = 1.0
    assert torch.ops.tokenmill.argmax_rows(ties).tolist() == [5, 97]


def test_kernels_refuse_out_of_range_blocks_and_slots() -> None:
    kv = torch.zeros(kv_cache_shape(4, 16, 1, 16))
    q = torch.randn(1, 2, 16)
    meta = AttentionMetadata(
        torch.tensor([0, 1], dtype=torch.int32), torch.tensor([20], dtype=torch.int32),
        torch.tensor([[0, 4]], dtype=torch.int32), torch.zeros(1, dtype=torch.long), 1, 20,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="outside the cache"):
        CpuKernelOps.attention(q, kv, meta, 0.25)
    cos_sin = cos_sin_cache(RopeConfig(), 16, 64)
    qkv = torch.randn(1, 4 * 16)
    with pytest.raises(RuntimeError, match="outside the cache"):
        CpuKernelOps.rope_write_kv(qkv, torch.tensor([3]), cos_sin, kv, torch.tensor([64]), 2, 1)


def test_kernel_and_torch_paths_draw_the_same_tokens() -> None:
    from tokenmill.core.request import SamplingParams
    from tokenmill.model.backend import sample_rows_kernel
    from tokenmill.model.sampler import Sampler, SamplingRow

    def row(**params) -> SamplingRow:
        return SamplingRow(SamplingParams(**params), [], [], (2,))

    g = torch.Generator().manual_seed(9)
    n, vocab = 64, 3000
    logits = torch.randn(n, vocab, generator=g) * torch.linspace(0.1, 8, n)[:, None]
    combos = [
        dict(temperature=1.0), dict(temperature=0.5, top_k=40), dict(top_p=0.8),
        dict(temperature=1.3, top_k=100, top_p=0.9), dict(min_p=0.05), dict(top_p=0.95, min_p=0.1),
    ]  # fmt: skip
    rows = [row(**combos[i % len(combos)]) for i in range(n)]
    u = torch.rand(n, generator=g)
    want = Sampler._sample_torch(logits, rows, u)
    got = sample_rows_kernel(
        logits, [r.params.temperature for r in rows], [r.params.top_k for r in rows],
        [r.params.top_p for r in rows], [r.params.min_p for r in rows], u,
    ).tolist()  # fmt: skip
    assert got == want


def test_thread_limit_caps_the_kernels_under_torchs_count() -> None:
    with kernel_threads(2):
        assert kernels.set_thread_limit(1) == 0
        assert kernels.kernel_threads() == 1
        kernels.set_thread_limit(8)  # above torch's count: torch's count
        assert kernels.kernel_threads() == 2
        torch.set_num_threads(1)  # torch's count stays the ceiling
        assert kernels.kernel_threads() == 1
    with pytest.raises(RuntimeError, match="n must be >= 0"):
        kernels.set_thread_limit(-1)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_reference_on_one_and_two_threads(threads: int, dtype: torch.dtype) -> None:
    # the thread controller switches between counts mid-generation: every count must agree
    # with the reference, at sizes where each kernel does split its work across threads
    torch.manual_seed(threads)
    rows, k, n = 40, 96, 200
    x, w = torch.randn(rows, k).to(dtype), torch.randn(n, k).to(dtype)
    normed_x, nw = torch.randn(rows, 576).to(dtype), (1 + 0.1 * torch.randn(576)).to(dtype)
    gu = (torch.randn(rows, 2 * 2048) * 4).to(dtype)
    lens = [1100, 900, 1200]  # few long decodes: attention splits each context across threads
    meta = AttentionMetadata(
        torch.arange(4, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32),
        torch.randperm(300)[:225].view(3, 75).to(torch.int32), torch.zeros(3, dtype=torch.long),
        1, max(lens),
    )  # fmt: skip
    kv = torch.randn(kv_cache_shape(300, 16, 2, 64)).to(dtype)
    q = torch.randn(3, 8, 64).to(dtype)
    with kernel_threads(threads):
        ops = CpuKernelOps(use_packed_gemm=kernels.has_avx512())
        got_lin = ops.linear(x, ops.prepare_linear(w))
        got_norm = CpuKernelOps.rms_norm(normed_x, nw, 1e-6)
        got_silu = CpuKernelOps.silu_mul(gu)
        got_attn = CpuKernelOps.attention(q, kv, meta, 0.125)
        got_argmax = torch.ops.tokenmill.argmax_rows(gu.float())
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.25, rtol=2e-2)
    torch.testing.assert_close(
        got_lin.float(), torch.nn.functional.linear(x.float(), w.float()), **tol
    )
    torch.testing.assert_close(
        got_norm.float(), TorchOps.rms_norm(normed_x, nw, 1e-6).float(), **TOL[dtype]
    )
    torch.testing.assert_close(got_silu.float(), TorchOps.silu_mul(gu).float(), **TOL[dtype])
    want_attn = paged_attention_reference(q, kv, meta, 0.125)
    torch.testing.assert_close(got_attn.float(), want_attn.float(), **TOL[dtype])
    assert torch.equal(got_argmax, gu.float().argmax(-1))
