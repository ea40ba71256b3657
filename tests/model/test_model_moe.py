"""The mixture-of-experts compute: the grouped-GEMM CPU kernel against the per-expert torch
reference (fp32 / bf16 / int8 experts), routing as transformers does, and the family ops."""

from __future__ import annotations

import pytest
import torch

from tokenmill.model import kernels
from tokenmill.model.backend import CpuKernelOps, TorchOps
from tokenmill.model.config import MoeConfig

pytestmark = pytest.mark.skipif(
    not kernels.cpu_kernels_available() or not kernels.has_avx512(),
    reason="the packed-weight CPU kernels need AVX-512 here",
)
# bf16: the kernel keeps the SiLU-gated intermediate in fp32 where the reference rounds it
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=6e-2, rtol=3e-2)}


def experts_and_routing(num_experts, hidden, inter, tokens, top_k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = [torch.randn(2 * inter, hidden, generator=g) * 0.2 for _ in range(num_experts)]
    w2 = [torch.randn(hidden, inter, generator=g) * 0.2 for _ in range(num_experts)]
    x = torch.randn(tokens, hidden, generator=g)
    logits = torch.randn(tokens, num_experts, generator=g)
    weights, ids = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return w13, w2, x, ids, weights


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, "int8"])
@pytest.mark.parametrize(
    ("num_experts", "hidden", "inter", "tokens", "top_k"),
    [
        (8, 64, 32, 1, 2),  # one decode token: two experts, the rest idle
        (8, 72, 48, 7, 2),  # hidden not a multiple of 16
        (4, 64, 32, 200, 3),  # prefill: every expert hit, row chunks of up to 96
        (16, 32, 16, 5, 1),  # top-1
    ],
)
def test_kernel_matches_reference(wdtype, num_experts, hidden, inter, tokens, top_k) -> None:
    w13, w2, x, ids, weights = experts_and_routing(num_experts, hidden, inter, tokens, top_k)
    quant = "int8" if wdtype == "int8" else None
    act = torch.bfloat16 if wdtype in (torch.bfloat16, "int8") else torch.float32
    load = torch.float32 if quant else act
    ref_ops, ops = TorchOps(), CpuKernelOps(use_packed_gemm=True)
    ref = [ref_ops.prepare_expert(a.to(load), b.to(load), quant) for a, b in zip(w13, w2, strict=True)]
    packed = [ops.prepare_expert(a.to(load), b.to(load), quant) for a, b in zip(w13, w2, strict=True)]
    assert all(e.gate_up.packed is not None and e.gate_up.silu_gate for e in packed)
    xa = x.to(act)
    want = ref_ops.moe_experts(xa, ids, weights, ref)
    got = ops.moe_experts(xa, ids, weights, packed)
    assert got.dtype == act and got.shape == x.shape
    torch.testing.assert_close(got.float(), want.float(), **TOL[act])
    rel = (got.float() - want.float()).abs().mean() / want.float().abs().mean()
    assert rel < (1e-6 if act == torch.float32 else 5e-3)
    # the packed layout unpacks to the checkpoint's weights (a backend switch relies on it)
    for e, (a, _) in zip(packed, zip(w13, w2, strict=True), strict=True):
        if not quant:
            assert torch.equal(e.gate_up.dense_weight(), a.to(load))


def test_kernel_refuses_bad_routing() -> None:
    w13, w2, x, ids, weights = experts_and_routing(4, 32, 16, 3, 2)
    ops = CpuKernelOps(use_packed_gemm=True)
    packed = [ops.prepare_expert(a, b) for a, b in zip(w13, w2, strict=True)]
    with pytest.raises(RuntimeError, match="expert id"):
        ops.moe_experts(x, ids + 4, weights, packed)
    with pytest.raises(RuntimeError, match="topk_weights"):
        ops.moe_experts(x, ids, weights[:, :1], packed)


def test_routing_follows_transformers_mixtral_and_qwen3_moe() -> None:
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    from tokenmill.model.moe import MoeBlock, ResidentExperts

    torch.manual_seed(0)
    x = torch.randn(9, 32)
    for hf_router, norm in (
        (MixtralTopKRouter(MixtralConfig(hidden_size=32, num_local_experts=6, num_experts_per_tok=2)), True),
        (Qwen3MoeTopKRouter(Qwen3MoeConfig(hidden_size=32, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False)), False),
    ):
        hf_router.weight.data.normal_()
        moe = MoeConfig(6, 2, 16, norm_topk_prob=norm, sparse_layers=(True,))
        cfg = type("Cfg", (), {"moe": moe})()
        block = MoeBlock(cfg, 0, hf_router.weight.data, ResidentExperts({}, torch.float32))
        _, weights, ids = block.route(x)
        with torch.no_grad():
            _, hf_weights, hf_ids = hf_router(x)
        assert torch.equal(ids, hf_ids)
        torch.testing.assert_close(weights, hf_weights.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_and_gelu_kernels_match_reference(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    heads, kv_heads, head_dim, t = 4, 2, 16, 9
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim).to(dtype)
    qw, kw = (1 + 0.1 * torch.randn(head_dim)).to(dtype), (1 + 0.1 * torch.randn(head_dim)).to(dtype)
    want, got = qkv.clone(), qkv.clone()
    TorchOps.qk_norm(want, qw, kw, heads, kv_heads, 1e-6)
    CpuKernelOps.qk_norm(got, qw, kw, heads, kv_heads, 1e-6)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    assert torch.equal(got[:, -kv_heads * head_dim :], qkv[:, -kv_heads * head_dim :])  # v untouched
    x = (torch.randn(t, 2 * 40) * 3).to(dtype)
    torch.testing.assert_close(
        CpuKernelOps.gelu_mul(x).float(), TorchOps.gelu_mul(x).float(), **TOL[dtype]
    )


@pytest.mark.parametrize("ops", [TorchOps(), CpuKernelOps(use_packed_gemm=True)], ids=["torch", "kernels"])
@pytest.mark.parametrize(("source", "dtype", "quant"), [
    (torch.float32, torch.float32, None), (torch.bfloat16, torch.float32, None),
    (torch.float32, torch.bfloat16, None), (torch.float32, torch.float32, "int8"),
])  # fmt: skip
def test_filling_a_cache_slot_equals_preparing_the_expert(ops, source, dtype, quant) -> None:
    # hidden 72: the down projection's last panel is partial
    g = torch.Generator().manual_seed(1)
    gate, up, down = (torch.randn(*s, generator=g).to(source) for s in ((32, 72), (32, 72), (72, 32)))
    want = ops.prepare_expert(torch.cat([gate, up]).to(dtype), down.to(dtype), quant)
    slot = want.empty_like()
    for t in slot.tensors():
        t.fill_(7)  # stale contents of an earlier expert
    ops.fill_expert(slot, gate, up, down, dtype, quant)
    for a, b in zip(slot.tensors(), want.tensors(), strict=True):
        assert torch.equal(a, b)
