"""Weight-only int8 quantization: symmetric, one scale per output channel.

``dtype="int8"`` keeps activations and the KV cache in bfloat16 and stores
every linear layer's weight (q/k/v/o, gate/up/down and the LM head) as int8
with one fp32 scale per output row: ``w[n, k] ~= q[n, k] * scale[n]``. The
embedding lookup stays bfloat16 (it reads one row per token, so halving its
bytes gains nothing). Products accumulate in fp32.
"""

from __future__ import annotations

import torch

QMAX = 127  # symmetric: -127..127, so -w quantizes to -q


def quantize_per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [N, K] int8, scale [N] fp32)`` with ``|q * scale - weight| <= scale / 2``.

    The scale is rounded *up* to a bfloat16-representable value so that the
    stock ``torch._weight_int8pack_mm`` (which takes the scales in the
    activations' dtype) and tokenmill's fp32-scale kernel compute with the very
    same numbers; rounding up (by at most ~1 %) keeps ``|weight| / scale <= 127``
    so no value is clipped and the half-step error bound still holds.
    """
    w = weight.float()
    amax = w.abs().amax(dim=1)
    scale = amax / QMAX
    # x(1 + 2^-7) then round-to-nearest bf16 is >= x: the bf16 rounding error is <= 2^-8 relative
    scale = (scale * (1 + 2**-7)).to(torch.bfloat16).float()
    scale = torch.where(amax > 0, scale, torch.ones_like(scale))  # all-zero rows: q = 0
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 ``[N, K]`` weight that ``q`` and ``scale`` stand for."""
    return q.float() * scale[:, None]
