"""The grouped LoRA kernel (csrc/lora.cpp) against the per-adapter torch reference.

Adapters of different ranks and part sets share one call; rows of one adapter
are scattered through the batch, base rows in between stay untouched, output
widths that are not multiples of 16 exercise the masked tails, and the
``[gate; up]`` panel layout of the fused SiLU-gate GEMM is checked against
de-interleaving the reference.
"""

from __future__ import annotations

import pytest
import torch

from tokenmill.core.lora import LoRARequest
from tokenmill.lora.adapter import AdapterWeights, LoraModule, LoraPart
from tokenmill.lora.batch import LoraBatch, prepare_adapter
from tokenmill.model import kernels
from tokenmill.model.backend import CpuKernelOps, TorchOps, interleave_gate_up

pytestmark = pytest.mark.skipif(not kernels.cpu_kernels_available(), reason="the CPU kernels could not be built")

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def adapter(lora_id: int, in_features: int, parts: list[tuple[int, int, int]], dtype, seed: int) -> AdapterWeights:
    """One adapter on linear layer ("qkv", layer 0): ``parts`` are (out offset, out features, rank)."""
    g = torch.Generator().manual_seed(seed)
    a_rows, lora_parts, h = [], [], 0
    for off, out, r in parts:
        a_rows.append(torch.randn(r, in_features, generator=g) * 0.3)
        lora_parts.append(LoraPart(off, out, h, r, (torch.randn(out, r, generator=g) * 0.3).to(dtype)))
        h += r
    module = LoraModule(in_features, torch.cat(a_rows).to(dtype), lora_parts)
    return AdapterWeights(f"a{lora_id}", "/nowhere", max(r for *_, r in parts), {(0, "qkv"): module}, ())


def run_both(adapters, segments, x, y, inter=0):
    want, got = y.clone(), y.clone()
    for ops, out in ((TorchOps(), want), (CpuKernelOps(use_packed_gemm=True), got)):
        prepared = [prepare_adapter(LoRARequest(w.name, i + 1, w.path), w, ops, 1) for i, w in enumerate(adapters)]
        ops.lora_apply(out, x, LoraBatch(prepared, segments, x.device), 0, "qkv", inter)
    return want, got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("in_features", "parts_a", "parts_b", "segments"),
    [
        # q/k/v parts of two adapters (one adapts q and v only), decode rows interleaved
        (64, [(0, 64, 8), (64, 32, 8), (96, 32, 8)], [(0, 64, 16), (96, 32, 16)],
         [(0, 0, 1), (1, 1, 1), (0, 3, 1), (1, 4, 1), (0, 6, 1)]),
        # widths that are not multiples of 16 (masked tails), ranks over one panel
        (72, [(0, 36, 20)], [(36, 18, 3), (54, 18, 5)], [(0, 0, 7), (1, 9, 2), (0, 11, 1)]),
        # a prefill chunk of 130 rows (several row tasks) beside a decode row
        (48, [(0, 40, 4)], [(0, 40, 32)], [(0, 0, 130), (1, 131, 1)]),
    ],
)  # fmt: skip
def test_kernel_matches_reference(dtype, in_features, parts_a, parts_b, segments) -> None:
    adapters = [adapter(1, in_features, parts_a, dtype, 1), adapter(2, in_features, parts_b, dtype, 2)]
    rows = max(start + n for _, start, n in segments) + 2
    out = max(off + n for off, n, _ in parts_a + parts_b)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    y = torch.randn(rows, out, generator=g).to(dtype)
    want, got = run_both(adapters, segments, x, y)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    adapted = {r for _, start, n in segments for r in range(start, start + n)}
    untouched = [r for r in range(rows) if r not in adapted]
    assert torch.equal(got[untouched], y[untouched])  # base rows keep the base output, bit for bit
    assert not torch.allclose(got[sorted(adapted)].float(), y[sorted(adapted)].float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_up_panel_layout(dtype) -> None:
    """With ``inter``, the delta of logical [gate; up] columns lands in the fused layout."""
    hidden, inter = 48, 64
    adapters = [
        adapter(1, hidden, [(0, inter, 8), (inter, inter, 8)], dtype, 5),
        adapter(2, hidden, [(inter, inter, 4)], dtype, 6),  # up only
    ]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, hidden, generator=g).to(dtype)
    y_natural = torch.randn(6, 2 * inter, generator=g).to(dtype)
    segments = [(0, 0, 2), (1, 3, 2)]
    want, _ = run_both(adapters, segments, x, y_natural)  # reference in the natural layout
    y_panels = interleave_gate_up(y_natural.T.contiguous()).T.contiguous()
    ops = CpuKernelOps(use_packed_gemm=True)
    prepared = [prepare_adapter(LoRARequest(w.name, i + 1, w.path), w, ops, 1) for i, w in enumerate(adapters)]
    ops.lora_apply(y_panels, x, LoraBatch(prepared, segments, x.device), 0, "qkv", inter)
    got = interleave_gate_up(y_panels.T.contiguous(), inverse=True).T
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    # and the panel SiLU-gate equals silu(gate) * up of the natural layout
    act = ops.silu_mul_panels(y_panels)
    torch.testing.assert_close(act.float(), TorchOps.silu_mul(got).float(), **TOL[dtype])
    torch.testing.assert_close(TorchOps.silu_mul_panels(y_panels).float(), act.float(), **TOL[dtype])


def test_kernel_refuses_mismatched_tables() -> None:
    """A table row that does not fit the layer is refused, not read past the tensors."""
    ops = CpuKernelOps(use_packed_gemm=True)
    w = adapter(1, 32, [(0, 32, 4)], torch.float32, 0)
    prepared = [prepare_adapter(LoRARequest("a", 1, "/x"), w, ops, 1)]
    batch = LoraBatch(prepared, [(0, 0, 2)], torch.device("cpu"))
    with pytest.raises(RuntimeError, match="does not match x"):
        ops.lora_apply(torch.zeros(2, 32), torch.zeros(2, 48), batch, 0, "qkv")  # x of another width
    with pytest.raises(RuntimeError, match="does not fit the layer"):
        ops.lora_apply(torch.zeros(2, 16), torch.zeros(2, 32), batch, 0, "qkv")  # y narrower than the part
