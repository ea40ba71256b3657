"""The torch reference of the paged KV layout and attention (what the kernels are checked against)."""

from __future__ import annotations

import torch

from tokenmill.model.attention import (
    AttentionMetadata,
    gather_kv,
    kv_cache_shape,
    paged_attention_padded,
    paged_attention_reference,
    write_kv_reference,
)


def test_written_tokens_gather_back_in_order() -> None:
    block_size, kv_heads, head_dim = 4, 2, 8
    kv = torch.zeros(kv_cache_shape(10, block_size, kv_heads, head_dim))
    table = torch.tensor([7, 2, 9], dtype=torch.int32)
    n = 11
    pos = torch.arange(n)
    slots = table.long()[pos // block_size] * block_size + pos % block_size
    k, v = torch.randn(n, kv_heads, head_dim), torch.randn(n, kv_heads, head_dim)
    write_kv_reference(kv, k, v, slots)
    got_k, got_v = gather_kv(kv, table, n, head_dim)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    # blocks outside the table stay untouched
    untouched = [b for b in range(10) if b not in (7, 2, 9)]
    assert kv[:, untouched].abs().sum() == 0


def test_reference_equals_dense_causal_attention() -> None:
    # one sequence, prompt of 9 then a chunk of 4: the chunk's rows equal full causal attention
    torch.manual_seed(0)
    block_size, heads, kv_heads, head_dim, total = 4, 4, 2, 8, 13
    kv = torch.zeros(kv_cache_shape(6, block_size, kv_heads, head_dim))
    table = torch.tensor([[3, 0, 5, 1]], dtype=torch.int32)
    k, v = torch.randn(total, kv_heads, head_dim), torch.randn(total, kv_heads, head_dim)
    pos = torch.arange(total)
    write_kv_reference(kv, k, v, table[0].long()[pos // block_size] * block_size + pos % block_size)
    q = torch.randn(total, heads, head_dim)
    meta = AttentionMetadata(
        torch.tensor([0, 4], dtype=torch.int32), torch.tensor([total], dtype=torch.int32),
        table, torch.zeros(4, dtype=torch.long), 4, total,
    )  # fmt: skip
    got = paged_attention_reference(q[9:], kv, meta, 0.5)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1),
        v.repeat_interleave(2, 1).transpose(0, 1), is_causal=True, scale=0.5,
    ).transpose(0, 1)  # fmt: skip
    torch.testing.assert_close(got, dense[9:], atol=1e-5, rtol=1e-5)


def test_padded_batched_attention_equals_reference() -> None:
    # mixed batch: a prefill chunk after cached context, decodes, a fresh prompt
    torch.manual_seed(1)
    block_size, heads, kv_heads, head_dim = 4, 6, 2, 8
    kv = torch.randn(kv_cache_shape(40, block_size, kv_heads, head_dim))
    n_queries, lens = [5, 1, 1, 7], [13, 9, 22, 7]
    tables = torch.randperm(40)[:24].view(4, 6).to(torch.int32)
    starts = [0]
    for n in n_queries:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        torch.tensor(starts, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32), tables,
        torch.zeros(starts[-1], dtype=torch.long), max(n_queries), max(lens),
    )  # fmt: skip
    q = torch.randn(starts[-1], heads, head_dim)
    torch.testing.assert_close(
        paged_attention_padded(q, kv, meta, 0.3), paged_attention_reference(q, kv, meta, 0.3),
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip
