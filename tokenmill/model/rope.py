"""Rotary position embedding tables: one precomputed ``[max_len, head_dim]`` cos|sin cache.

Row ``p`` holds ``cos(p * inv_freq)`` in its first half and ``sin(p * inv_freq)``
in its second; kernels index it by position so no per-step trigonometry runs.
Rotation is the "rotate half" (GPT-NeoX) layout the Llama family uses.

``longrope`` (Phi-3) has two tables stacked, ``[2 * max_len, head_dim]``: rows
``[0, max_len)`` use the short factors, rows ``[max_len, 2 * max_len)`` the long
ones; ``rope_positions`` picks the long rows for the tokens of a sequence that
has grown past the original context length.
"""

from __future__ import annotations

import math

import torch

from tokenmill.model.config import RopeConfig


def inv_frequencies(
    rope: RopeConfig, head_dim: int, max_model_len: int, long: bool = False
) -> torch.Tensor:
    """Per-pair inverse frequencies ``[head_dim // 2]`` (fp32) for ``rope``'s type.

    ``long`` selects longrope's long factors (its short ones otherwise).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if rope.rope_type == "longrope":
        factors = rope.long_factor if long else rope.short_factor
        if len(factors) != head_dim // 2:
            raise ValueError(f"longrope factors must have head_dim / 2 = {head_dim // 2} entries")
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * rope.theta**exponents)
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, rope, max_model_len)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig, max_model_len: int) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by ``factor``, short ones kept, the band between
    # interpolated smoothly.
    old_len = rope.original_max_position_embeddings or max_model_len
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _table(inv_freq: torch.Tensor, max_model_len: int, scale: float) -> torch.Tensor:
    positions = torch.arange(max_model_len, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos() * scale, freqs.sin() * scale], dim=-1)


def cos_sin_cache(rope: RopeConfig, head_dim: int, max_model_len: int) -> torch.Tensor:
    """The ``[max_model_len, head_dim]`` fp32 table ``cat(cos, sin)`` per position.

    ``longrope``: ``[2 * max_model_len, head_dim]``, short-factor rows then long-factor rows.
    """
    inv_freq = inv_frequencies(rope, head_dim, max_model_len)
    if rope.rope_type != "longrope":
        return _table(inv_freq, max_model_len, 1.0).contiguous()
    long_freq = inv_frequencies(rope, head_dim, max_model_len, long=True)
    scale = rope.attention_factor
    return torch.cat(
        [_table(inv_freq, max_model_len, scale), _table(long_freq, max_model_len, scale)]
    ).contiguous()


def rope_positions(
    rope: RopeConfig,
    positions: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    max_model_len: int,
) -> torch.Tensor:
    """Rows of ``cos_sin_cache`` for each token: its position, or for ``longrope`` past the
    original context (the sequence's length after this step exceeds it) the long-factor row.

    A sequence switches to the long factors once it is longer than the original
    context, as in transformers (where the longest position of the batch decides).
    """
    if rope.rope_type != "longrope":
        return positions
    original = rope.original_max_position_embeddings or max_model_len
    long_seq = seq_lens.to(positions.device).long() > original
    if not bool(long_seq.any()):
        return positions
    counts = (query_start_loc[1:] - query_start_loc[:-1]).to(positions.device).long()
    per_token = torch.repeat_interleave(long_seq, counts, output_size=positions.shape[0])
    return positions + per_token.long() * max_model_len


def apply_rope_reference(
    x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor
) -> torch.Tensor:
    """Rotate ``x [T, heads, head_dim]`` by ``positions [T]``; returns a new tensor in x's dtype."""
    half = x.shape[-1] // 2
    cs = cache.index_select(0, positions)
    cos = cs[:, None, :half].to(x.dtype)
    sin = cs[:, None, half:].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
