"""Rotary position embedding tables: one precomputed ``[max_len, head_dim]`` cos|sin cache.

Row ``p`` holds ``cos(p * inv_freq)`` in its first half and ``sin(p * inv_freq)``
in its second; kernels index it by position so no per-step trigonometry runs.
Rotation is the "rotate half" (GPT-NeoX) layout the Llama family uses.
"""

from __future__ import annotations

import math

import torch

from tokenmill.model.config import RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int, max_model_len: int) -> torch.Tensor:
    """Per-pair inverse frequencies ``[head_dim // 2]`` (fp32) for ``rope``'s type."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
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


def cos_sin_cache(rope: RopeConfig, head_dim: int, max_model_len: int) -> torch.Tensor:
    """The ``[max_model_len, head_dim]`` fp32 table ``cat(cos, sin)`` per position."""
    inv_freq = inv_frequencies(rope, head_dim, max_model_len)
    positions = torch.arange(max_model_len, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).contiguous()


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
