"""The one place that picks how a layer's primitive ops run on a device and dtype.

``TorchOps`` is plain torch and runs anywhere (it is also the numerical
reference); ``CpuKernelOps`` calls the compiled CPU extension (paged attention
straight from the blocks, fused RMSNorm / RoPE+KV-write / SiLU-gate, and a
packed-weight GEMM for every linear); ``AcceleratorOps`` runs attention as one
batched SDPA call on GPUs (a Triton or FlashInfer backend would be added
here). ``select_ops`` chooses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.model import kernels
from tokenmill.model.attention import (
    AttentionMetadata,
    paged_attention_padded,
    paged_attention_reference,
    write_kv_reference,
)
from tokenmill.model.quant import dequantize, quantize_per_channel_int8
from tokenmill.model.rope import apply_rope_reference

PANEL = 16  # output features per packed panel (one AVX-512 vector of fp32)


@dataclass(slots=True)
class Linear:
    """A linear layer's weight in the form the active backend wants.

    ``weight`` is the ``[out, in]`` matrix (None once packed away); ``packed`` is
    the ``[ceil(out / 16), in, 16]`` panel layout of the CPU GEMM kernel (bf16
    weights with an even ``in`` on CPUs with AVX-512-BF16: ``[ceil(out / 16),
    in / 2, 32]``, 16 outputs x 2 consecutive inputs per row). With
    int8 weights (``scale`` set) both hold int8 values and ``scale`` is the fp32
    per-output-channel scale (zero padded to whole panels when packed).
    ``silu_gate`` marks a gated-MLP ``[gate; up]`` weight whose output features
    are stored as alternating 16-feature gate and up panels (``interleave_gate_up``),
    with ``bias`` and ``scale`` in the same order, for the fused SiLU-gate GEMM.
    """

    out_features: int
    weight: torch.Tensor | None
    bias: torch.Tensor | None = None
    packed: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    silu_gate: bool = False

    def dense_weight(self) -> torch.Tensor:
        """The ``[out, in]`` weight, unpacking the panel layout (and dequantizing to fp32)."""
        if self.weight is not None:
            w = self.weight
        else:
            assert self.packed is not None
            panels, k, width = self.packed.shape
            if width == 2 * PANEL:  # bf16 k-pair panels [P, K / 2, 16 x 2]
                pairs = self.packed.view(panels, k, PANEL, 2).permute(0, 2, 1, 3)
                w = pairs.reshape(panels * PANEL, 2 * k)[: self.out_features]
            else:
                w = self.packed.permute(0, 2, 1).reshape(panels * PANEL, k)[: self.out_features]
        if self.scale is not None:
            w = dequantize(w, self.scale[: self.out_features])
        return interleave_gate_up(w, inverse=True) if self.silu_gate else w

    def dense_bias(self) -> torch.Tensor | None:
        """The bias in the checkpoint's feature order."""
        if self.bias is None or not self.silu_gate:
            return self.bias
        return interleave_gate_up(self.bias, inverse=True)


def interleave_gate_up(t: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Reorder the rows of a ``[gate; up]`` weight (or bias) into alternating 16-row panels.

    Row order becomes gate[0:16], up[0:16], gate[16:32], up[16:32], ... so that a
    GEMM task holding panel pairs has both halves of the same features;
    ``inverse`` undoes it. The intermediate size must be a multiple of 16.
    """
    rows, rest = t.shape[0], t.shape[1:]
    if inverse:
        return t.reshape(rows // (2 * PANEL), 2, PANEL, *rest).transpose(0, 1).reshape(t.shape)
    return t.reshape(2, rows // (2 * PANEL), PANEL, *rest).transpose(0, 1).reshape(t.shape)


class TorchOps:
    """Reference implementations in plain torch; every backend must match these."""

    name = "torch"

    @staticmethod
    def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return w * normed.to(x.dtype)

    @classmethod
    def add_rms_norm(
        cls, x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """``residual += x`` in place, then return ``rms_norm(residual)``."""
        residual.add_(x)
        return cls.rms_norm(residual, w, eps)

    @staticmethod
    def rope_write_kv(
        qkv: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
    ) -> None:
        """Rotate q and k inside ``qkv [T, (H + 2 KVH) * D]`` in place and store k, v in the cache."""
        head_dim = cos_sin.shape[-1]
        t = qkv.shape[0]
        heads = qkv.view(t, num_heads + 2 * num_kv_heads, head_dim)
        qk = heads[:, : num_heads + num_kv_heads]
        qk.copy_(apply_rope_reference(qk, positions, cos_sin))
        k = heads[:, num_heads : num_heads + num_kv_heads]
        v = heads[:, num_heads + num_kv_heads :]
        write_kv_reference(kv_cache, k, v, slot_mapping)

    @staticmethod
    def attention(
        q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        return paged_attention_reference(q, kv_cache, meta, scale)

    @staticmethod
    def silu_mul(x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def prepare_linear(
        weight: torch.Tensor, bias: torch.Tensor | None = None, quant: str | None = None
    ) -> Linear:
        """Lay out one weight; ``quant="int8"`` quantizes it per output channel first."""
        if quant is None:
            return Linear(weight.shape[0], weight.contiguous(), bias)
        if quant != "int8":
            raise ValueError(f"unknown weight quantization {quant!r}")
        q, scale = quantize_per_channel_int8(weight)
        return Linear(weight.shape[0], q, bias, scale=scale)

    @staticmethod
    def linear(x: torch.Tensor, lin: Linear) -> torch.Tensor:
        if lin.scale is not None:
            return int8_linear_torch(x, lin)
        return F.linear(x, lin.dense_weight(), lin.dense_bias())

    def prepare_gate_up(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, quant: str | None = None
    ) -> Linear:
        """Lay out a gated MLP's fused ``[gate; up]`` weight (``gate_up_silu`` consumes it)."""
        return self.prepare_linear(weight, bias, quant)

    def gate_up_silu(self, x: torch.Tensor, lin: Linear) -> torch.Tensor:
        """``SiLU(x @ gate^T) * (x @ up^T)``."""
        return self.silu_mul(self.linear(x, lin))


def int8_linear_torch(x: torch.Tensor, lin: Linear) -> torch.Tensor:
    """``x @ dequant(W)^T + b`` with the stock int8-weight kernel (scales in x's dtype).

    The scales are bf16-representable (see ``quantize_per_channel_int8``) so the
    cast is exact for bf16 and fp32 activations.
    """
    assert lin.weight is not None and lin.scale is not None
    y = torch._weight_int8pack_mm(x, lin.weight, lin.scale.to(x.dtype))
    return y if lin.bias is None else y.add_(lin.bias)


class AcceleratorOps(TorchOps):
    """Torch ops for GPUs: attention as one batched SDPA call over gathered, padded contexts.

    (No Python loop over sequences, no host sync.) A Triton / FlashInfer paged kernel
    would replace ``attention`` here where installed.
    """

    name = "torch_batched"

    @staticmethod
    def attention(
        q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        return paged_attention_padded(q, kv_cache, meta, scale)


class CpuKernelOps(TorchOps):
    """The compiled CPU extension (fp32 and bf16)."""

    name = "cpu_kernels"

    def __init__(self, use_packed_gemm: bool) -> None:
        self.use_packed_gemm = use_packed_gemm

    @staticmethod
    def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        return torch.ops.tokenmill.rms_norm(x, w, eps)

    @classmethod
    def add_rms_norm(
        cls, x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float
    ) -> torch.Tensor:
        return torch.ops.tokenmill.add_rms_norm(x, residual, w, eps)

    @staticmethod
    def rope_write_kv(
        qkv: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
    ) -> None:
        torch.ops.tokenmill.rope_write_kv(
            qkv, positions, cos_sin, kv_cache, slot_mapping, num_heads, num_kv_heads
        )

    @staticmethod
    def attention(
        q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        return torch.ops.tokenmill.paged_attention(
            q, kv_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale
        )

    @staticmethod
    def silu_mul(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.tokenmill.silu_mul(x)

    def prepare_linear(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, quant: str | None = None
    ) -> Linear:
        if not self.use_packed_gemm:
            return TorchOps.prepare_linear(weight, bias, quant)
        if quant is not None:
            lin = TorchOps.prepare_linear(weight, bias, quant)
            assert lin.weight is not None and lin.scale is not None
            n = lin.out_features
            panels = (n + PANEL - 1) // PANEL
            lin.packed = torch.ops.tokenmill.pack_weight(lin.weight)
            lin.scale = F.pad(lin.scale, (0, panels * PANEL - n))
            lin.weight = None
            return lin
        # the packed copy replaces the dense one: weights are held once
        packed = torch.ops.tokenmill.pack_weight(weight.contiguous())
        return Linear(weight.shape[0], None, bias, packed)

    def linear(self, x: torch.Tensor, lin: Linear) -> torch.Tensor:
        if lin.packed is None:
            return TorchOps.linear(x, lin)
        if lin.scale is not None:
            return torch.ops.tokenmill.packed_linear_int8(
                x, lin.packed, lin.scale, lin.out_features, lin.bias
            )
        return torch.ops.tokenmill.packed_linear(x, lin.packed, lin.out_features, lin.bias)

    def prepare_gate_up(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, quant: str | None = None
    ) -> Linear:
        # the fused kernel needs whole (gate, up) panel pairs: intermediate size % 16 == 0
        if not self.use_packed_gemm or weight.shape[0] % (2 * PANEL):
            return self.prepare_linear(weight, bias, quant)
        lin = self.prepare_linear(
            interleave_gate_up(weight), None if bias is None else interleave_gate_up(bias), quant
        )
        lin.silu_gate = True
        return lin

    def gate_up_silu(self, x: torch.Tensor, lin: Linear) -> torch.Tensor:
        if not lin.silu_gate:
            return super().gate_up_silu(x, lin)
        # one GEMM whose epilogue applies SiLU(gate) * up: the [T, 2I] product is never stored
        if lin.scale is not None:
            return torch.ops.tokenmill.packed_linear_int8(
                x, lin.packed, lin.scale, lin.out_features, lin.bias, True
            )
        return torch.ops.tokenmill.packed_linear(x, lin.packed, lin.out_features, lin.bias, True)


BACKENDS = ("auto", "torch", "torch_batched", "cpu_kernels")

# The CPU attention kernel keeps a head's accumulators in registers: 16 vectors at most.
CPU_KERNEL_MAX_HEAD_DIM = 256


def select_ops(
    device: torch.device, dtype: torch.dtype, prefer: str = "auto", head_dim: int = 0
) -> TorchOps:
    """Pick the ops for ``device``, ``dtype`` and ``head_dim``; ``prefer`` forces one of ``BACKENDS``."""
    if prefer not in BACKENDS:
        raise ValueError(f"unknown ops backend {prefer!r}; use one of {', '.join(BACKENDS)}")
    if prefer == "torch":
        return TorchOps()
    if prefer == "torch_batched":
        return AcceleratorOps()
    if device.type != "cpu":
        return AcceleratorOps()
    unsupported = None
    if dtype not in (torch.float32, torch.bfloat16):
        unsupported = f"the CPU kernels support float32 and bfloat16, not {dtype}"
    elif head_dim > CPU_KERNEL_MAX_HEAD_DIM:
        unsupported = (
            f"the CPU kernels support head_dim <= {CPU_KERNEL_MAX_HEAD_DIM}, not {head_dim}"
        )
    if unsupported:
        if prefer == "cpu_kernels":
            raise ValueError(unsupported)
        return TorchOps()
    if kernels.cpu_kernels_available():
        return CpuKernelOps(use_packed_gemm=kernels.has_avx512())
    if prefer == "cpu_kernels":
        raise RuntimeError("the CPU kernels were requested but could not be built")
    return TorchOps()


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` for a 2-d tensor; the CPU kernel where it is loaded (torch's is slow)."""
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 2
        and x.shape[1] > 0
        and kernels.cpu_kernels_loaded()
    ):
        return torch.ops.tokenmill.argmax_rows(x.contiguous())
    return x.argmax(dim=-1)


def sampling_kernel_applies(x: torch.Tensor) -> bool:
    """Whether ``sample_rows_kernel`` can sample these logits (fp32 rows on CPU, kernels loaded)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and kernels.cpu_kernels_loaded()


def sample_rows_kernel(
    x: torch.Tensor,
    temperature: list[float],
    top_k: list[int],
    top_p: list[float],
    min_p: list[float],
    u: torch.Tensor,
    bitmask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row of ``x`` drawn with uniforms ``u`` by the fused CPU kernel.

    ``bitmask`` (int32 ``[rows, ceil(vocab / 32)]``, xgrammar's packed layout) keeps only
    the tokens whose bit is set; a temperature of 0 takes the masked argmax.
    """
    return torch.ops.tokenmill.sample_rows(
        x.contiguous(),
        torch.tensor(temperature, dtype=torch.float32),
        torch.tensor(top_k, dtype=torch.long),
        torch.tensor(top_p, dtype=torch.float32),
        torch.tensor(min_p, dtype=torch.float32),
        u.float().contiguous(),
        None if bitmask is None else bitmask.contiguous(),
    )
