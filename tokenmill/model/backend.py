"""The one place that picks how a layer's primitive ops run on a device and dtype.

``TorchOps`` is plain torch and runs anywhere (it is also the numerical
reference); ``CpuKernelOps`` calls the compiled CPU extension (paged attention
straight from the blocks, fused RMSNorm / RoPE+KV-write / SiLU-gate, and a
packed-weight GEMM for every linear); ``AcceleratorOps`` runs attention as one
batched SDPA call on GPUs (a Triton or FlashInfer backend would be added
here). ``select_ops`` chooses.

Mixture-of-experts layers prepare each expert with ``prepare_expert`` and run
all of a layer's routed tokens with one ``moe_experts`` call: the reference
loops over the experts hit, the CPU kernel groups tokens by expert and runs
grouped GEMMs over packed expert weights.

LoRA adapters add their low-rank products to a linear layer's output with
``lora_apply`` (a ``lora.batch.LoraBatch`` says which rows run which adapter):
the reference runs each adapter of the batch on its rows in torch, the CPU
kernel runs every adapter's shrink and expand in one call (``csrc/lora.cpp``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tokenmill.model import kernels
from tokenmill.model.attention import (
    PLAIN,
    AttentionMetadata,
    paged_attention_padded,
    paged_attention_reference,
    write_kv_reference,
)
from tokenmill.model.kv_format import KVFormat
from tokenmill.model.quant import dequantize, quantize_per_channel_int8
from tokenmill.model.rope import apply_rope_reference

if TYPE_CHECKING:
    from tokenmill.lora.batch import LoraBatch

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


@dataclass(slots=True)
class Expert:
    """One SwiGLU expert: ``gate_up`` ([gate; up] of 2I outputs) and ``down`` (H outputs)."""

    gate_up: Linear
    down: Linear

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        """The tensors holding this expert, in a fixed order."""
        return [
            t
            for lin in (self.gate_up, self.down)
            for t in (lin.weight, lin.packed, lin.scale)
            if t is not None
        ]

    def empty_like(self) -> Expert:
        """An expert of the same layout with uninitialised tensors (a cache slot)."""

        def lin(x: Linear) -> Linear:
            def e(t: torch.Tensor | None) -> torch.Tensor | None:
                return None if t is None else torch.empty_like(t)

            return Linear(x.out_features, e(x.weight), None, e(x.packed), e(x.scale), x.silu_gate)

        return Expert(lin(self.gate_up), lin(self.down))


def pack_panels(w: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` -> the ``[ceil(N / 16), K, 16]`` panel layout (zero padded), in torch."""
    n, k = w.shape
    panels = (n + PANEL - 1) // PANEL
    w = F.pad(w, (0, 0, 0, panels * PANEL - n))
    return w.view(panels, PANEL, k).transpose(1, 2).contiguous()


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
    # whether ``lora_apply`` runs the compiled kernel (adapters then keep packed copies)
    lora_kernel = False

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
        kv_format: KVFormat = PLAIN,
    ) -> None:
        """Rotate q and k inside ``qkv [T, (H + 2 KVH) * D]`` in place and store k, v in the cache
        (quantized when ``kv_format`` is)."""
        head_dim = cos_sin.shape[-1]
        t = qkv.shape[0]
        heads = qkv.view(t, num_heads + 2 * num_kv_heads, head_dim)
        qk = heads[:, : num_heads + num_kv_heads]
        qk.copy_(apply_rope_reference(qk, positions, cos_sin))
        k = heads[:, num_heads : num_heads + num_kv_heads]
        v = heads[:, num_heads + num_kv_heads :]
        write_kv_reference(kv_cache, k, v, slot_mapping, kv_format)

    @staticmethod
    def attention(
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int = 0,
        softcap: float = 0.0,
    ) -> torch.Tensor:
        return paged_attention_reference(q, kv_cache, meta, scale, window, softcap)

    @classmethod
    def qk_norm(
        cls,
        qkv: torch.Tensor,
        q_weight: torch.Tensor,
        k_weight: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        eps: float,
    ) -> None:
        """RMSNorm each q and k head of ``qkv [T, (H + 2 KVH) * D]`` in place (before RoPE)."""
        heads = qkv.view(qkv.shape[0], -1, q_weight.shape[0])
        q, k = heads[:, :num_heads], heads[:, num_heads : num_heads + num_kv_heads]
        q.copy_(cls.rms_norm(q, q_weight, eps))
        k.copy_(cls.rms_norm(k, k_weight, eps))

    @staticmethod
    def silu_mul(x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def gelu_mul(x: torch.Tensor) -> torch.Tensor:
        """GeGLU: ``gelu_tanh(gate) * up`` of ``x = [gate | up]``."""
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up

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

    def gate_up_gelu(self, x: torch.Tensor, lin: Linear) -> torch.Tensor:
        """``gelu_tanh(x @ gate^T) * (x @ up^T)`` (``lin`` from ``prepare_linear``)."""
        return self.gelu_mul(self.linear(x, lin))

    @staticmethod
    def silu_mul_panels(x: torch.Tensor) -> torch.Tensor:
        """``silu_mul`` of a ``[gate; up]`` product laid out as a ``silu_gate`` weight's
        (alternating 16-column gate and up panels, ``interleave_gate_up``)."""
        t, n = x.shape
        panels = x.view(t, n // (2 * PANEL), 2, PANEL)
        return (F.silu(panels[:, :, 0]) * panels[:, :, 1]).reshape(t, n // 2)

    def lora_apply(
        self, y: torch.Tensor, x: torch.Tensor, batch: LoraBatch, layer: int, key: str, inter: int = 0
    ) -> None:
        """``y += x @ A^T @ B^T`` of each row's adapter for linear layer ``key`` of ``layer``,
        in place; ``inter`` > 0: y is a ``silu_gate`` layout of ``[gate; up]`` (2 x inter)."""
        batch.apply_reference(y, x, layer, key, inter)

    def prepare_expert(
        self, gate_up: torch.Tensor, down: torch.Tensor, quant: str | None = None
    ) -> Expert:
        """Lay out one expert's ``[gate; up]`` and ``down`` weights for ``moe_experts``."""
        return Expert(self.prepare_linear(gate_up, None, quant), self.prepare_linear(down, None, quant))

    def fill_expert(
        self,
        slot: Expert,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        dtype: torch.dtype,
        quant: str | None = None,
    ) -> None:
        """Write the expert of checkpoint tensors ``gate``, ``up``, ``down`` (cast to ``dtype``
        first) into ``slot``, an expert this ops prepared before (same shapes)."""
        fresh = self.prepare_expert(torch.cat([gate, up]).to(dtype), down.to(dtype).contiguous(), quant)
        for dst, src in zip(slot.tensors(), fresh.tensors(), strict=True):
            dst.copy_(src)

    def moe_experts(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        experts: list[Expert],
    ) -> torch.Tensor:
        """``sum_j topk_weights[t, j] * expert[topk_ids[t, j]](x[t])`` for each row ``t``.

        The reference runs each expert hit on its tokens and adds the weighted outputs
        in ascending expert order into an ``x``-dtype sum, as transformers does.
        """
        out = torch.zeros_like(x)
        for e in torch.unique(topk_ids).tolist():
            tok, slot = torch.where(topk_ids == e)
            exp = experts[e]
            h = self.linear(self.silu_mul(self.linear(x[tok], exp.gate_up)), exp.down)
            out.index_add_(0, tok, (h * topk_weights[tok, slot, None]).to(x.dtype))
        return out


def int8_linear_torch(x: torch.Tensor, lin: Linear) -> torch.Tensor:
    """``x @ dequant(W)^T + b`` with the stock int8-weight kernel (scales in x's dtype).

    The scales are bf16-representable (see ``quantize_per_channel_int8``) so the
    cast is exact for bf16 and fp32 activations.
    """
    assert lin.weight is not None and lin.scale is not None
    if x.shape[-1] % 16:
        # the stock kernel crashes on an input width that is not a multiple of 16 (torch 2.13)
        y = ((x.float() @ lin.weight.float().T) * lin.scale).to(x.dtype)
        return y if lin.bias is None else y.add_(lin.bias)
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
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int = 0,
        softcap: float = 0.0,
    ) -> torch.Tensor:
        return paged_attention_padded(q, kv_cache, meta, scale, window, softcap)


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
        kv_format: KVFormat = PLAIN,
    ) -> None:
        torch.ops.tokenmill.rope_write_kv(
            qkv, positions, cos_sin, kv_cache, slot_mapping, num_heads, num_kv_heads, kv_format.code
        )

    @staticmethod
    def attention(
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int = 0,
        softcap: float = 0.0,
    ) -> torch.Tensor:
        return torch.ops.tokenmill.paged_attention(
            q, kv_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale,
            window, softcap, meta.kv_format.code, meta.attn_mass,
        )  # fmt: skip

    @staticmethod
    def qk_norm(
        qkv: torch.Tensor,
        q_weight: torch.Tensor,
        k_weight: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        eps: float,
    ) -> None:
        torch.ops.tokenmill.qk_rms_norm(qkv, q_weight, k_weight, num_heads, num_kv_heads, eps)

    @staticmethod
    def silu_mul(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.tokenmill.silu_mul(x)

    @staticmethod
    def gelu_mul(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.tokenmill.gelu_tanh_mul(x)

    lora_kernel = True

    @staticmethod
    def silu_mul_panels(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.tokenmill.silu_mul_panels(x)

    def lora_apply(
        self, y: torch.Tensor, x: torch.Tensor, batch: LoraBatch, layer: int, key: str, inter: int = 0
    ) -> None:
        # every adapter of the batch in one call, rows grouped by adapter (Punica's SGMV)
        torch.ops.tokenmill.lora_apply(y, x, batch.table(layer, key), batch.rows, batch.offsets, inter)

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

    def prepare_expert(
        self, gate_up: torch.Tensor, down: torch.Tensor, quant: str | None = None
    ) -> Expert:
        # the grouped kernel reads plain [P, K, 16] panels (SiLU-gate interleaved for gate_up),
        # whatever layout the dense GEMM prefers on this CPU
        if not self.use_packed_gemm or gate_up.shape[0] % (2 * PANEL):
            return TorchOps.prepare_expert(self, gate_up, down, quant)
        lins = []
        for w, gated in ((interleave_gate_up(gate_up), True), (down, False)):
            lin = TorchOps.prepare_linear(w, None, quant)
            assert lin.weight is not None
            lin.packed = pack_panels(lin.weight)
            lin.weight = None
            if lin.scale is not None:
                lin.scale = F.pad(lin.scale, (0, lin.packed.shape[0] * PANEL - lin.out_features))
            lin.silu_gate = gated
            lins.append(lin)
        return Expert(*lins)

    def fill_expert(
        self,
        slot: Expert,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        dtype: torch.dtype,
        quant: str | None = None,
    ) -> None:
        gu, dn = slot.gate_up.packed, slot.down.packed
        if quant is not None or gu is None or dn is None or gu.dtype != dtype:
            return super().fill_expert(slot, gate, up, down, dtype, quant)
        # straight from the (mapped) checkpoint into the slot's panels, one strided copy each:
        # gate|up interleaved by 16-row panel (interleave_gate_up), then [P, K, 16] (pack_panels)
        inter, hidden = gate.shape
        panels = gu.view(inter // PANEL, 2, hidden, PANEL)
        panels[:, 0].copy_(gate.view(inter // PANEL, PANEL, hidden).transpose(1, 2))
        panels[:, 1].copy_(up.view(inter // PANEL, PANEL, hidden).transpose(1, 2))
        full = down.shape[0] // PANEL
        dn[:full].copy_(down[: full * PANEL].view(full, PANEL, inter).transpose(1, 2))
        if full < dn.shape[0]:  # a partial last panel: zero padded
            dn[full].zero_()
            dn[full, :, : down.shape[0] - full * PANEL].copy_(down[full * PANEL :].T)

    def moe_experts(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        experts: list[Expert],
    ) -> torch.Tensor:
        if any(e.gate_up.packed is None for e in experts):
            return super().moe_experts(x, topk_ids, topk_weights, experts)
        quant = experts[0].gate_up.scale is not None
        return torch.ops.tokenmill.moe_experts(
            x.contiguous(),
            topk_ids.contiguous(),
            topk_weights.float().contiguous(),
            [e.gate_up.packed for e in experts],
            [e.down.packed for e in experts],
            [e.gate_up.scale for e in experts] if quant else [],
            [e.down.scale for e in experts] if quant else [],
            experts[0].gate_up.out_features // 2,
        )


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
