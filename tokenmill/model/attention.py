"""Paged attention: metadata, the KV-cache layout, and the pure-torch reference.

A layer's KV cache is one preallocated tensor
``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (K then V). Token ``p``
of a sequence lives in slot ``block_table[p // block_size] * block_size +
p % block_size``. A step's tokens from all sequences are flattened into one
``[T, ...]`` batch; ``AttentionMetadata`` says where each sequence's queries
start, how long its context is (cached + new) and which blocks hold it.

The reference here gathers each sequence's context and runs a masked softmax:
simple and device-agnostic, it is what the compiled kernels are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Where each sequence's queries and context are, for one forward pass."""

    query_start_loc: torch.Tensor  # int32 [B + 1]: seq b's queries are rows [q[b], q[b+1])
    seq_lens: torch.Tensor  # int32 [B]: context length after this step (cached + new)
    block_tables: torch.Tensor  # int32 [B, max_blocks]: padded block tables
    slot_mapping: torch.Tensor  # int64 [T]: cache slot of each new token
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


def kv_cache_shape(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
) -> tuple[int, ...]:
    return (2, num_blocks, block_size, num_kv_heads, head_dim)


def write_kv_reference(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store ``k, v [T, kv_heads, head_dim]`` into their slots of ``kv_cache``."""
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def paged_attention_reference(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of ``q [T, heads, head_dim]`` over the paged context; returns ``[T, heads, head_dim]``.

    Query ``i`` of a sequence with ``n`` queries and context length ``L`` sits
    at position ``L - n + i`` and sees keys ``0 ..= L - n + i``. Math in fp32.
    """
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    num_heads = q.shape[1]
    group = num_heads // kv_heads
    flat = kv_cache.view(2, num_blocks * block_size, kv_heads, head_dim)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    starts = meta.query_start_loc.tolist()
    lens = meta.seq_lens.tolist()
    for b, ctx_len in enumerate(lens):
        q_start, q_end = starts[b], starts[b + 1]
        n = q_end - q_start
        if n == 0:
            continue
        pos = torch.arange(ctx_len, device=q.device)
        blocks = meta.block_tables[b].to(q.device).long()[pos // block_size]
        slots = blocks * block_size + pos % block_size
        k = flat[0].index_select(0, slots).float().repeat_interleave(group, dim=1)  # [L, H, D]
        v = flat[1].index_select(0, slots).float().repeat_interleave(group, dim=1)
        qs = q[q_start:q_end].float()  # [n, H, D]
        scores = torch.einsum("nhd,lhd->hnl", qs, k) * scale
        q_pos = torch.arange(ctx_len - n, ctx_len, device=q.device)
        mask = pos[None, :] > q_pos[:, None]  # [n, L]
        scores.masked_fill_(mask[None], float("-inf"))
        probs = scores.softmax(dim=-1)
        out[q_start:q_end] = torch.einsum("hnl,lhd->nhd", probs, v).to(q.dtype)
    return out
