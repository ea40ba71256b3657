"""Paged attention: metadata, the KV-cache layout, and the pure-torch reference.

A layer's KV cache is one preallocated tensor
``[2, num_blocks, num_kv_heads, block_size * head_dim]`` (K then V). Within a
block, one head's K is stored transposed, ``[head_dim, block_size]``, so a
kernel scores 16 keys with one vector FMA per head-dim element; V is
``[block_size, head_dim]`` (``k_blocks`` / ``v_blocks`` give these views).
Token ``p`` of a sequence lives in slot ``block_table[p // block_size] *
block_size + p % block_size``. A step's tokens from all sequences are flattened into one
``[T, ...]`` batch; ``AttentionMetadata`` says where each sequence's queries
start, how long its context is (cached + new) and which blocks hold it.

The reference here gathers each sequence's context and runs a masked softmax:
simple and device-agnostic, it is what the compiled kernels are tested against.

The cache may also be stored quantized (``kv_format.py``: int8 / int4 with
per-token scales); ``AttentionMetadata.kv_format`` says how, and the reference
dequantizes what it gathers. With ``AttentionMetadata.attn_mass`` set, the
attention adds each key's softmax probability, summed over query rows and the
heads of its KV head, into ``attn_mass [num_seqs, kv_heads, width]`` (H2O's
heavy-hitter statistics; the caller zeroes it and passes it to every layer).

Two options change the scores: a sliding ``window`` (query at position ``p``
sees keys ``p - window + 1 ..= p`` only, as transformers' sliding masks: Mistral,
Gemma 2/3, Phi-3) and a tanh ``softcap`` (Gemma 2: ``cap * tanh(s / cap)`` of
the scaled scores, before masking).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.model.kv_format import KVFormat, kv_format, read_tokens, write_tokens

PLAIN = kv_format("auto")


@dataclass(slots=True)
class AttentionMetadata:
    """Where each sequence's queries and context are, for one forward pass."""

    query_start_loc: torch.Tensor  # int32 [B + 1]: seq b's queries are rows [q[b], q[b+1])
    seq_lens: torch.Tensor  # int32 [B]: context length after this step (cached + new)
    block_tables: torch.Tensor  # int32 [B, max_blocks]: padded block tables
    slot_mapping: torch.Tensor  # int64 [T]: cache slot of each new token
    max_query_len: int
    max_seq_len: int
    kv_format: KVFormat = PLAIN  # how the cache stores K and V
    attn_mass: torch.Tensor | None = None  # fp32 [B, kv_heads, >= max_seq_len], accumulated into

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


def kv_cache_shape(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, fmt: KVFormat = PLAIN
) -> tuple[int, ...]:
    return fmt.cache_shape(num_blocks, block_size, num_kv_heads, head_dim)


def k_blocks(kv_cache: torch.Tensor, head_dim: int) -> torch.Tensor:
    """K as ``[num_blocks, kv_heads, head_dim, block_size]`` (a view)."""
    _, num_blocks, kv_heads, elems = kv_cache.shape
    return kv_cache[0].view(num_blocks, kv_heads, head_dim, elems // head_dim)


def v_blocks(kv_cache: torch.Tensor, head_dim: int) -> torch.Tensor:
    """V as ``[num_blocks, kv_heads, block_size, head_dim]`` (a view)."""
    _, num_blocks, kv_heads, elems = kv_cache.shape
    return kv_cache[1].view(num_blocks, kv_heads, elems // head_dim, head_dim)


def write_kv_reference(
    kv_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    fmt: KVFormat = PLAIN,
) -> None:
    """Store ``k, v [T, kv_heads, head_dim]`` into their slots of ``kv_cache`` (negative: skipped)."""
    write_tokens(kv_cache, k, v, slot_mapping, fmt)


def gather_kv(
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    length: int,
    head_dim: int,
    fmt: KVFormat = PLAIN,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``length`` tokens' K and V of one sequence, each ``[length, kv_heads, head_dim]``
    (fp32 when the cache is quantized)."""
    block_size = fmt.block_size_of(kv_cache, head_dim)
    pos = torch.arange(length, device=kv_cache.device)
    blocks = block_table.to(kv_cache.device).long()[pos // block_size]
    return read_tokens(kv_cache, blocks, pos % block_size, head_dim, fmt)


def paged_attention_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Causal attention of ``q [T, heads, head_dim]`` over the paged context; returns ``[T, heads, head_dim]``.

    Query ``i`` of a sequence with ``n`` queries and context length ``L`` sits
    at position ``p = L - n + i`` and sees keys ``0 ..= p`` (with ``window``:
    ``p - window + 1 ..= p``). Math in fp32.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = kv_cache.shape[2]
    group = num_heads // kv_heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    starts = meta.query_start_loc.tolist()
    lens = meta.seq_lens.tolist()
    for b, ctx_len in enumerate(lens):
        q_start, q_end = starts[b], starts[b + 1]
        n = q_end - q_start
        if n == 0:
            continue
        k, v = gather_kv(kv_cache, meta.block_tables[b], ctx_len, head_dim, meta.kv_format)
        k = k.float().repeat_interleave(group, dim=1)  # [L, H, D]
        v = v.float().repeat_interleave(group, dim=1)
        qs = q[q_start:q_end].float()  # [n, H, D]
        scores = torch.einsum("nhd,lhd->hnl", qs, k) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        pos = torch.arange(ctx_len, device=q.device)
        q_pos = torch.arange(ctx_len - n, ctx_len, device=q.device)
        masked = pos[None, :] > q_pos[:, None]
        if window:
            masked |= pos[None, :] <= q_pos[:, None] - window
        scores.masked_fill_(masked[None], float("-inf"))
        probs = scores.softmax(dim=-1)
        if meta.attn_mass is not None:
            meta.attn_mass[b, :, :ctx_len] += probs.view(kv_heads, group * n, ctx_len).sum(1).to(meta.attn_mass.device)
        out[q_start:q_end] = torch.einsum("hnl,lhd->nhd", probs, v).to(q.dtype)
    return out


def paged_attention_padded(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """The same attention as the reference, batched: gather to padded tensors, one SDPA call.

    No per-sequence Python loop and no host synchronisation (only the metadata's
    ``max_query_len`` / ``max_seq_len`` ints), so it suits accelerators; it copies each
    context once per call, which is what the CPU kernel avoids.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = kv_cache.shape[2]
    dev = q.device
    qsl = meta.query_start_loc.to(dev).long()
    lens = meta.seq_lens.to(dev).long()
    n_q = qsl[1:] - qsl[:-1]  # [B]
    q_max, l_max = meta.max_query_len, meta.max_seq_len
    i = torch.arange(q_max, device=dev)
    q_valid = i[None, :] < n_q[:, None]  # [B, Qmax]
    q_rows = (qsl[:-1, None] + i[None, :]).clamp(max=q.shape[0] - 1)
    qp = q[q_rows]  # [B, Qmax, H, D]
    block_size = meta.kv_format.block_size_of(kv_cache, head_dim)
    pos = torch.arange(l_max, device=dev)
    tables = meta.block_tables.to(dev).long()
    width = tables.shape[1]
    blocks = tables[:, (pos // block_size).clamp(max=width - 1)]  # [B, Lmax]
    offsets = (pos % block_size).expand_as(blocks)
    k, v = read_tokens(kv_cache, blocks, offsets, head_dim, meta.kv_format)  # [B, Lmax, KVH, D]
    q_pos = lens[:, None] - n_q[:, None] + i[None, :]  # [B, Qmax]
    allowed = (pos[None, None, :] <= q_pos[:, :, None]) & (pos[None, None, :] < lens[:, None, None])
    if window:
        allowed &= pos[None, None, :] > q_pos[:, :, None] - window
    allowed &= q_valid[:, :, None]
    allowed[:, :, 0] |= ~q_valid  # padded query rows see key 0 (discarded), never nothing
    group = num_heads // kv_heads
    qf = qp.transpose(1, 2).float()
    kf = k.repeat_interleave(group, dim=2).transpose(1, 2).float()
    vf = v.repeat_interleave(group, dim=2).transpose(1, 2).float()
    mass = meta.attn_mass
    if softcap or mass is not None:
        # SDPA has no score hook and returns no probabilities: an explicit softmax
        scores = qf @ kf.transpose(-1, -2) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)  # [B, H, Qmax, Lmax]
        if mass is not None:
            valid = probs * q_valid[:, None, :, None]
            mass[:, :, :l_max] += valid.view(-1, kv_heads, group * q_max, l_max).sum(2).to(mass.device)
        out = (probs @ vf).transpose(1, 2)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            qf, kf, vf, attn_mask=allowed[:, None], scale=scale
        ).transpose(1, 2)  # [B, Qmax, H, D]
    return out[q_valid].to(q.dtype)
