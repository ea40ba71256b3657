"""Quantized KV caches (int8 / int4) and attention mass: the compiled kernels against the torch reference."""

from __future__ import annotations

import random

import pytest
import torch

from tests.model.test_model_kernels import random_batch
from tokenmill.model import kernels
from tokenmill.model.attention import (
    AttentionMetadata,
    gather_kv,
    paged_attention_padded,
    paged_attention_reference,
)
from tokenmill.model.backend import CpuKernelOps, TorchOps
from tokenmill.model.config import RopeConfig
from tokenmill.model.kv_format import (
    KV_CACHE_DTYPES,
    dequantize,
    kv_format,
    quantize,
    read_tokens,
    write_tokens,
)
from tokenmill.model.rope import cos_sin_cache

needs_kernels = pytest.mark.skipif(not kernels.cpu_kernels_available(), reason="CPU kernels could not be built here")

FORMATS = [kv_format(n) for n in KV_CACHE_DTYPES]
QUANTIZED = [f for f in FORMATS if f.quantized]


def filled_cache(fmt, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 spread: float = 2.0) -> torch.Tensor:  # fmt: skip
    """A cache in ``fmt`` whose every slot holds random K and V (with a few outlier channels)."""
    cache = torch.zeros(fmt.cache_shape(num_blocks, block_size, kv_heads, head_dim), dtype=fmt.cache_dtype(dtype))
    n = num_blocks * block_size
    k = torch.randn(n, kv_heads, head_dim) * spread
    k[:, :, :3] *= 6  # outlier channels, as real keys have
    v = torch.randn(n, kv_heads, head_dim)
    write_tokens(cache, k.to(dtype), v.to(dtype), torch.arange(n), fmt)
    return cache


def test_quantize_round_trips_within_half_a_step() -> None:
    torch.manual_seed(0)
    x = torch.randn(50, 3, 64) * torch.rand(50, 3, 1) * 10
    x[0, 0] = 0.0  # an all-zero row: scale 0, codes 0, exact
    for fmt in QUANTIZED:
        codes, scale, zero = quantize(x, fmt)
        back = dequantize(codes, scale, zero, fmt)
        step = scale.float()[..., None]
        assert torch.all((back - x).abs() <= step * 0.5 + 1e-3 * x.abs().amax(-1, keepdim=True) + 1e-6), fmt.name
        assert torch.equal(back[0, 0], torch.zeros(64))


def test_block_bytes_follow_the_format() -> None:
    # head_dim 64, block 16: bf16 2048 bytes per head and block; int8 16 * (64 + 2); int4 16 * (32 + 4)
    bf16 = kv_format("auto").head_block_bytes(16, 64, torch.bfloat16)
    assert bf16 == 2048
    assert kv_format("int8").head_block_bytes(16, 64, torch.bfloat16) == 1056
    assert kv_format("int4").head_block_bytes(16, 64, torch.bfloat16) == 576
    assert bf16 / 1056 >= 1.9 and bf16 / 576 >= 3.5
    for fmt in FORMATS:
        cache = torch.zeros(fmt.cache_shape(3, 16, 2, 64), dtype=fmt.cache_dtype(torch.bfloat16))
        assert fmt.block_size_of(cache, 64) == 16
        assert cache[:, 0, 0].numel() * cache.element_size() == fmt.head_block_bytes(16, 64, torch.bfloat16) * 2


def test_an_unknown_kv_dtype_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown KV cache dtype 'fp8'; use one of auto, int8, int4"):
        kv_format("fp8")


@needs_kernels
@pytest.mark.parametrize("fmt", QUANTIZED, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_write_kv_quantizes_like_the_reference(fmt, dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    heads, kv_heads, head_dim, block_size, num_blocks, t = 6, 2, 64, 16, 12, 37
    cos_sin = cos_sin_cache(RopeConfig(theta=10000.0), head_dim, 512)
    positions = torch.randint(0, 512, (t,))
    slots = torch.randperm(num_blocks * block_size)[:t]
    slots[5] = -1  # a padding token: computed, not stored
    qkv = (torch.randn(t, (heads + 2 * kv_heads) * head_dim) * 3).to(dtype)
    shape = fmt.cache_shape(num_blocks, block_size, kv_heads, head_dim)
    kv_a = torch.zeros(shape, dtype=torch.uint8)
    kv_b = kv_a.clone()
    qkv_a, qkv_b = qkv.clone(), qkv.clone()
    TorchOps.rope_write_kv(qkv_a, positions, cos_sin, kv_a, slots, heads, kv_heads, fmt)
    CpuKernelOps.rope_write_kv(qkv_b, positions, cos_sin, kv_b, slots, heads, kv_heads, fmt)
    keep = slots >= 0
    blocks, offsets = slots[keep] // block_size, slots[keep] % block_size
    ka, va = read_tokens(kv_a, blocks, offsets, head_dim, fmt)
    kb, vb = read_tokens(kv_b, blocks, offsets, head_dim, fmt)
    # the rotation may round differently in its last bit, which can move a code by one step
    for a, b in ((ka, kb), (va, vb)):
        step = (a.amax(-1, keepdim=True) - a.amin(-1, keepdim=True)) / (15 if fmt.code == 2 else 127)
        assert torch.all((a - b).abs() <= step * 1.01 + 1e-4)
    # and from the values the kernel rotated, its bytes are exactly the reference's
    heads_b = qkv_b.view(t, heads + 2 * kv_heads, head_dim)
    kv_c = torch.zeros(shape, dtype=torch.uint8)
    write_tokens(kv_c, heads_b[:, heads : heads + kv_heads], heads_b[:, heads + kv_heads :], slots, fmt)
    assert torch.equal(kv_b, kv_c)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[keep]] = False
    k_rest, _ = read_tokens(kv_b, torch.arange(num_blocks * block_size)[untouched] // block_size,
                            torch.arange(num_blocks * block_size)[untouched] % block_size, head_dim, fmt)  # fmt: skip
    assert k_rest.abs().sum() == 0  # nothing written outside the given slots


@needs_kernels
@pytest.mark.parametrize("fmt", QUANTIZED, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("num_heads", "kv_heads", "head_dim", "block_size", "max_query", "window", "softcap"),
    [
        (4, 4, 64, 16, 1, 0, 0.0),  # decode, MHA
        (8, 2, 64, 16, 1, 0, 0.0),  # decode, GQA
        (9, 3, 64, 16, 40, 0, 0.0),  # prefill chunks with cached context before them
        (4, 1, 80, 8, 24, 0, 0.0),  # head_dim not a multiple of 16 (int4 V: a half vector)
        (6, 2, 72, 5, 12, 0, 0.0),  # block size that is not a multiple of the key chunk
        (8, 2, 64, 16, 20, 37, 30.0),  # sliding window and soft-capping
    ],
)
def test_paged_attention_over_quantized_kv_matches_reference(
    fmt, dtype: torch.dtype, num_heads: int, kv_heads: int, head_dim: int, block_size: int,
    max_query: int, window: int, softcap: float,
) -> None:  # fmt: skip
    rng = random.Random(num_heads * 1000 + head_dim + block_size + fmt.code)
    torch.manual_seed(rng.randrange(1 << 30))
    num_blocks = 200
    meta, _ = random_batch(rng, num_seqs=7, block_size=block_size, num_blocks=num_blocks, max_ctx=150,
                           max_query=max_query)  # fmt: skip
    meta.kv_format = fmt
    kv = filled_cache(fmt, num_blocks, block_size, kv_heads, head_dim, dtype)
    total = int(meta.query_start_loc[-1])
    qkv = torch.randn(total, (num_heads + 2 * kv_heads) * head_dim).to(dtype)
    q = qkv[:, : num_heads * head_dim].view(total, num_heads, head_dim)
    scale = head_dim**-0.5
    got = CpuKernelOps.attention(q, kv, meta, scale, window, softcap)
    want = paged_attention_reference(q, kv, meta, scale, window, softcap)
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    # the batched (accelerator) path reads the same quantized blocks
    torch.testing.assert_close(paged_attention_padded(q, kv, meta, scale, window, softcap).float(), want.float(),
                               atol=1e-4 if dtype == torch.float32 else 3e-2, rtol=1e-4 if dtype == torch.float32 else 3e-2)  # fmt: skip


@needs_kernels
@pytest.mark.parametrize("fmt", QUANTIZED, ids=lambda f: f.name)
def test_long_quantized_decodes_split_across_threads(fmt) -> None:
    block_size, kv_heads, head_dim, num_seqs, ctx = 16, 2, 64, 1, 1300
    per = (ctx + block_size - 1) // block_size
    tables = torch.randperm(per + 3, generator=torch.Generator().manual_seed(5))[:per].view(1, per).to(torch.int32)
    kv = filled_cache(fmt, per + 3, block_size, kv_heads, head_dim, torch.float32, spread=3.0)
    meta = AttentionMetadata(torch.arange(2, dtype=torch.int32), torch.tensor([ctx], dtype=torch.int32), tables,
                             torch.zeros(1, dtype=torch.long), 1, ctx, kv_format=fmt)  # fmt: skip
    q = torch.randn(num_seqs, 6, head_dim) * 3
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = CpuKernelOps.attention(q, kv, meta, 0.125)
    finally:
        torch.set_num_threads(threads)
    # scale * (q . codes) + zero * sum(q) sums in another order than the reference's dequantized
    # values: fp32 rounding over 1300 keys
    torch.testing.assert_close(got, paged_attention_reference(q, kv, meta, 0.125), atol=5e-5, rtol=1e-4)


def test_quantized_attention_stays_close_to_full_precision() -> None:
    # what the formats cost: attention outputs over int8 / int4 KV against fp32 KV of the same values
    rng = random.Random(11)
    torch.manual_seed(11)
    meta, _ = random_batch(rng, num_seqs=5, block_size=16, num_blocks=80, max_ctx=200, max_query=8)
    k = torch.randn(80 * 16, 2, 64)
    v = torch.randn(80 * 16, 2, 64)
    q = torch.randn(int(meta.query_start_loc[-1]), 8, 64)
    outs = {}
    for fmt in FORMATS:
        cache = torch.zeros(fmt.cache_shape(80, 16, 2, 64), dtype=fmt.cache_dtype(torch.float32))
        write_tokens(cache, k, v, torch.arange(80 * 16), fmt)
        meta.kv_format = fmt
        outs[fmt.name] = paged_attention_reference(q, cache, meta, 0.125)
    err8 = (outs["int8"] - outs["auto"]).abs().mean() / outs["auto"].abs().mean()
    err4 = (outs["int4"] - outs["auto"]).abs().mean() / outs["auto"].abs().mean()
    assert err8 < 0.01 < err4 < 0.15


def _mass_case(fmt, window: int):
    rng = random.Random(21 + window)
    torch.manual_seed(21)
    meta, seqs = random_batch(rng, num_seqs=5, block_size=16, num_blocks=120, max_ctx=180, max_query=20)
    meta.kv_format = fmt
    kv = filled_cache(fmt, 120, 16, 2, 64, torch.float32)
    q = torch.randn(int(meta.query_start_loc[-1]), 6, 64) * 2
    return meta, seqs, kv, q


@pytest.mark.parametrize("window", [0, 40])
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_attention_mass_sums_each_rows_probabilities(fmt, window: int) -> None:
    meta, seqs, kv, q = _mass_case(fmt, window)
    width = max(c for c, _ in seqs) + 5
    meta.attn_mass = torch.zeros(len(seqs), 2, width)
    out = paged_attention_reference(q, kv, meta, 0.125, window)
    meta.attn_mass, mass = None, meta.attn_mass
    torch.testing.assert_close(out, paged_attention_reference(q, kv, meta, 0.125, window))  # mass changes nothing
    for b, (ctx, n) in enumerate(seqs):
        # every query row's probabilities sum to one: a kv head's mass is (group x queries)
        torch.testing.assert_close(mass[b].sum(-1), torch.full((2,), 3.0 * n), rtol=1e-4, atol=1e-4)
        assert mass[b, :, ctx:].abs().sum() == 0
        if window:
            assert mass[b, :, : max(0, ctx - n - window + 1)].abs().sum() == 0  # keys no query sees
    meta.attn_mass = torch.zeros(len(seqs), 2, width)
    paged_attention_padded(q, kv, meta, 0.125, window)
    torch.testing.assert_close(meta.attn_mass, mass, atol=1e-5, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("window", [0, 40])
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_kernel_attention_mass_matches_reference(fmt, window: int) -> None:
    meta, seqs, kv, q = _mass_case(fmt, window)
    width = max(c for c, _ in seqs)
    meta.attn_mass = torch.ones(len(seqs), 2, width)  # accumulated into, as over layers
    want_out = paged_attention_reference(q, kv, meta, 0.125, window)
    want = meta.attn_mass
    meta.attn_mass = torch.ones(len(seqs), 2, width)
    got_out = CpuKernelOps.attention(q, kv, meta, 0.125, window)
    torch.testing.assert_close(got_out, want_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(meta.attn_mass, want, atol=1e-5, rtol=1e-4)


@needs_kernels
def test_kernels_refuse_a_bad_format_or_mass() -> None:
    fmt = kv_format("int8")
    kv = torch.zeros(fmt.cache_shape(4, 16, 1, 16), dtype=torch.uint8)
    meta = AttentionMetadata(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([3], dtype=torch.int32),
                             torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, dtype=torch.long), 1, 3)  # fmt: skip
    q = torch.zeros(1, 1, 16)
    with pytest.raises(RuntimeError, match="q and kv_cache dtypes differ"):
        CpuKernelOps.attention(q, kv, meta, 1.0)  # a uint8 cache read as plain
    meta.kv_format = fmt
    assert CpuKernelOps.attention(q, kv, meta, 1.0).abs().sum() == 0
    with pytest.raises(RuntimeError, match="unknown kv_format"):
        torch.ops.tokenmill.paged_attention(q, kv, meta.block_tables, meta.query_start_loc, meta.seq_lens, 1.0, 0, 0.0, 7)
    meta.attn_mass = torch.zeros(1, 1, 2)
    with pytest.raises(RuntimeError, match="attn_mass is narrower"):
        CpuKernelOps.attention(q, kv, meta, 1.0)


def test_gather_kv_dequantizes_a_sequence_in_order() -> None:
    torch.manual_seed(2)
    for fmt in FORMATS:
        cache = torch.zeros(fmt.cache_shape(6, 4, 2, 8), dtype=fmt.cache_dtype(torch.float32))
        table = torch.tensor([5, 2, 0], dtype=torch.int32)
        k, v = torch.randn(10, 2, 8), torch.randn(10, 2, 8)
        pos = torch.arange(10)
        write_tokens(cache, k, v, table.long()[pos // 4] * 4 + pos % 4, fmt)
        gk, gv = gather_kv(cache, table, 10, 8, fmt)
        tol = {0: 0.0, 1: 0.03, 2: 0.4}[fmt.code]
        assert (gk - k).abs().max() <= tol and (gv - v).abs().max() <= tol


def test_the_engine_flag_offers_every_format() -> None:
    from dataclasses import fields

    from tokenmill.engine import EngineConfig
    from tokenmill.model.kv_format import KV_CACHE_DTYPES

    (field,) = [f for f in fields(EngineConfig) if f.name == "kv_cache_dtype"]
    assert tuple(field.metadata["cli"]["choices"]) == KV_CACHE_DTYPES
