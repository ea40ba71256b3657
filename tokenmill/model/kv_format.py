"""KV-cache storage formats: the model's dtype, or int8 / int4 with per-token scales.

``--kv-cache-dtype auto`` stores K and V in the model's dtype (the layout of
``attention.py``). ``int8`` and ``int4`` quantize each token's K and V per KV
head when they are written (the compiled RoPE+KV-write kernel, or
``write_tokens`` here) and the attention kernels dequantize in registers:

- ``int8``: symmetric, ``x = code * scale``, codes in [-127, 127], one fp16
  scale per (token, head): ``D + 2`` bytes per token and head instead of ``2 D``.
- ``int4``: asymmetric, ``x = code * scale + zero``, codes in [0, 15], fp16
  scale and zero per (token, head): ``D / 2 + 4`` bytes.

Scales in fp16 rather than fp32 keep the ratio to bf16 KV at 1.94x (int8) and
3.56x (int4) for ``head_dim`` 64. The cache of a quantized format is a
``uint8`` tensor ``[2, num_blocks, kv_heads, head_block_bytes]``; one head's
share of a block is its codes, then its ``block_size`` fp16 scales, then (int4)
its ``block_size`` fp16 zeros. Codes keep the plain layout's orientation: K
``[D][block_size]`` (int4: ``[D / 2][block_size]`` bytes, channels ``2c`` and
``2c + 1`` of a token in the low and high nibble of one byte), V
``[block_size][D]`` (int4: ``[block_size][D / 2]``, the same channel pairs).
No byte holds two tokens, so tokens are written independently.

Everything here is plain torch and device-agnostic: the reference the compiled
kernels are tested against, and the path of other devices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_CACHE_DTYPES = ("auto", "int8", "int4")


@dataclass(frozen=True, slots=True)
class KVFormat:
    """How one KV cache stores tokens; ``code`` is what the compiled kernels take."""

    name: str
    code: int  # 0: the model's dtype, 1: int8, 2: int4
    bits: int  # bits per stored K or V value (0: the model dtype's)

    @property
    def quantized(self) -> bool:
        return self.code != 0

    @property
    def has_zero(self) -> bool:
        return self.code == 2

    def data_bytes(self, block_size: int, head_dim: int) -> int:
        """Bytes of one head's codes in one block (K or V)."""
        return block_size * head_dim * self.bits // 8

    def head_block_bytes(self, block_size: int, head_dim: int, model_dtype: torch.dtype) -> int:
        """Bytes of one head's K (or V) in one block, scales included."""
        if not self.quantized:
            return block_size * head_dim * dtype_bytes(model_dtype)
        return self.data_bytes(block_size, head_dim) + (4 if self.has_zero else 2) * block_size

    def bytes_per_token(self, num_layers: int, kv_heads: int, head_dim: int, model_dtype: torch.dtype) -> float:
        """K and V bytes of one token, all layers."""
        return 2 * num_layers * kv_heads * self.head_block_bytes(1, head_dim, model_dtype)

    def cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return torch.uint8 if self.quantized else model_dtype

    def cache_shape(self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """One layer's cache: ``[2, num_blocks, kv_heads, elements]`` (bytes when quantized)."""
        last = self.head_block_bytes(block_size, head_dim, torch.uint8) if self.quantized else block_size * head_dim
        return (2, num_blocks, kv_heads, last)

    def block_size_of(self, cache: torch.Tensor, head_dim: int) -> int:
        """The block size of a cache in this format, from its last dimension."""
        last = cache.shape[-1]
        if not self.quantized:
            return last // head_dim
        return last // (head_dim * self.bits // 8 + (4 if self.has_zero else 2))


_FORMATS = {"auto": KVFormat("auto", 0, 0), "int8": KVFormat("int8", 1, 8), "int4": KVFormat("int4", 2, 4)}


def kv_format(name: str | KVFormat) -> KVFormat:
    """The format called ``name`` (one of ``KV_CACHE_DTYPES``); a clear error otherwise."""
    if isinstance(name, KVFormat):
        return name
    fmt = _FORMATS.get(name)
    if fmt is None:
        raise ValueError(f"unknown KV cache dtype {name!r}; use one of {', '.join(KV_CACHE_DTYPES)}")
    return fmt


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------ quantization


def quantize(x: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes (``uint8``; int8 codes as their two's-complement bytes), fp16 scale and zero of
    ``x [..., D]``, one scale (and zero) per row. Math in fp32 with the rounded fp16 scale, so
    that ``dequantize`` inverts it to within half a step."""
    xf = x.float()
    if fmt.code == 1:
        scale = (xf.abs().amax(-1) / 127.0).half()
        s = scale.float()[..., None]
        codes = torch.where(s > 0, torch.round(xf / s.clamp_min(1e-30)).clamp(-127, 127), 0.0)
        return codes.to(torch.int8).view(torch.uint8), scale, None
    if fmt.code == 2:
        zero = xf.amin(-1).half()
        z = zero.float()[..., None]
        scale = ((xf.amax(-1, keepdim=True) - z) / 15.0).half()[..., 0]
        s = scale.float()[..., None]
        codes = torch.where(s > 0, torch.round((xf - z) / s.clamp_min(1e-30)).clamp(0, 15), 0.0)
        return codes.to(torch.uint8), scale, zero
    raise ValueError(f"{fmt.name} KV is not quantized")


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: KVFormat) -> torch.Tensor:
    """fp32 values of ``codes [..., D]`` with per-row ``scale`` / ``zero [...]``."""
    c = codes.view(torch.int8).float() if fmt.code == 1 else codes.float()
    out = c * scale.float()[..., None]
    return out if zero is None else out + zero.float()[..., None]


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[..., 2n]`` codes in [0, 15] -> ``[..., n]`` bytes (channel 2c low, 2c + 1 high)."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack_nibbles(data: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` bytes -> ``[..., 2n]`` codes."""
    return torch.stack((data & 0xF, data >> 4), dim=-1).flatten(-2)


# ------------------------------------------------------------------ cache views


@dataclass(slots=True)
class _Views:
    """Views into one layer's quantized cache: codes of K ``[nb, kvh, Dc, bs]`` and V
    ``[nb, kvh, bs, Dc]`` (Dc = D, or D / 2 packed bytes for int4), scales and zeros
    ``[nb, kvh, bs]`` (fp16)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    k_zero: torch.Tensor | None
    v_zero: torch.Tensor | None


def _views(cache: torch.Tensor, fmt: KVFormat, head_dim: int) -> _Views:
    """Views of a cache ``[..., 2, nb, kvh, bytes]`` (one layer, or all layers)."""
    bs = fmt.block_size_of(cache, head_dim)
    nd = fmt.data_bytes(bs, head_dim)
    dc = head_dim * fmt.bits // 8

    def part(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        region = cache.select(-4, i)
        data = region[..., :nd]
        codes = data.unflatten(-1, (dc, bs)) if i == 0 else data.unflatten(-1, (bs, dc))
        scale = region[..., nd : nd + 2 * bs].view(torch.float16)
        zero = region[..., nd + 2 * bs : nd + 4 * bs].view(torch.float16) if fmt.has_zero else None
        return codes, scale, zero

    k, ks, kz = part(0)
    v, vs, vz = part(1)
    return _Views(k, v, ks, vs, kz, vz)


def read_tokens(
    cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor, head_dim: int, fmt: KVFormat
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the tokens at ``(blocks, offsets)`` (index tensors of one shape S), each
    ``[*S, kv_heads, D]``: the model dtype's values for a plain cache, fp32 dequantized ones
    for a quantized cache."""
    if not fmt.quantized:
        _, nb, kvh, elems = cache.shape
        kb = cache[0].view(nb, kvh, head_dim, elems // head_dim)
        vb = cache[1].view(nb, kvh, elems // head_dim, head_dim)
        return kb[blocks, :, :, offsets], vb[blocks, :, offsets, :]
    w = _views(cache, fmt, head_dim)
    kc, vc = w.k[blocks, :, :, offsets], w.v[blocks, :, offsets, :]
    if fmt.code == 2:
        kc, vc = _unpack_nibbles(kc), _unpack_nibbles(vc)

    def zero(z: torch.Tensor | None) -> torch.Tensor | None:
        return None if z is None else z[blocks, :, offsets]

    k = dequantize(kc, w.k_scale[blocks, :, offsets], zero(w.k_zero), fmt)
    v = dequantize(vc, w.v_scale[blocks, :, offsets], zero(w.v_zero), fmt)
    return k, v


def write_tokens(
    cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, fmt: KVFormat
) -> None:
    """Store ``k, v [T, kv_heads, D]`` into their slots (quantized on the way for int8 / int4).
    Negative slots (padding tokens) are skipped."""
    head_dim = k.shape[-1]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    bs = fmt.block_size_of(cache, head_dim)
    blocks, offsets = slot_mapping // bs, slot_mapping % bs
    if not fmt.quantized:
        _, nb, kvh, elems = cache.shape
        cache[0].view(nb, kvh, head_dim, bs)[blocks, :, :, offsets] = k.to(cache.dtype)
        cache[1].view(nb, kvh, bs, head_dim)[blocks, :, offsets, :] = v.to(cache.dtype)
        return
    w = _views(cache, fmt, head_dim)
    for x, codes, scale, zero, is_k in ((k, w.k, w.k_scale, w.k_zero, True), (v, w.v, w.v_scale, w.v_zero, False)):
        c, s, z = quantize(x, fmt)
        if fmt.code == 2:
            c = _pack_nibbles(c)
        if is_k:
            codes[blocks, :, :, offsets] = c
        else:
            codes[blocks, :, offsets, :] = c
        scale[blocks, :, offsets] = s
        if zero is not None:
            zero[blocks, :, offsets] = z


def copy_tokens(cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, head_dim: int, fmt: KVFormat) -> None:
    """Copy the stored K and V (codes and scales as they are: lossless) of slots ``src`` to
    slots ``dst`` in every layer of ``cache [layers, 2, num_blocks, kv_heads, elements]``.
    All sources are read before any destination is written."""
    if src.numel() == 0:
        return
    bs = fmt.block_size_of(cache, head_dim)
    sb, so, db, do = src // bs, src % bs, dst // bs, dst % bs
    if not fmt.quantized:
        layers, _, nb, kvh, _ = cache.shape
        kb = cache[:, 0].view(layers, nb, kvh, head_dim, bs)
        vb = cache[:, 1].view(layers, nb, kvh, bs, head_dim)
        kb[:, db, :, :, do] = kb[:, sb, :, :, so]
        vb[:, db, :, do, :] = vb[:, sb, :, so, :]
        return
    w = _views(cache, fmt, head_dim)
    w.k[:, db, :, :, do] = w.k[:, sb, :, :, so]
    w.v[:, db, :, do, :] = w.v[:, sb, :, so, :]
    for t in (w.k_scale, w.v_scale, w.k_zero, w.v_zero):
        if t is not None:
            t[:, db, :, do] = t[:, sb, :, so]
