"""Logits of Qwen3, Gemma 2/3, Phi-3, Mistral-with-window, Mixtral and Qwen3-MoE against
transformers, on tiny random checkpoints, through every backend and with chunked prefill."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenmill.model import load_model
from tokenmill.model.testing import load_hf_model, make_tiny_checkpoint, prefill_logits

LONGROPE = {
    "rope_type": "longrope", "original_max_position_embeddings": 32,
    "short_factor": [1.0 + 0.05 * i for i in range(8)], "long_factor": [1.5 + 0.2 * i for i in range(8)],
}  # fmt: skip
GEMMA3_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
}

CASES = {
    "qwen3": ("qwen3", {}),
    "gemma2": ("gemma2", {}),  # window 8, scores and logits soft-capped
    "gemma3": ("gemma3", {"layer_types": ["sliding_attention", "full_attention"], "rope_parameters": GEMMA3_ROPE}),
    "phi3": ("phi3", {}),
    "phi3_longrope": ("phi3", {"rope_parameters": {**LONGROPE, "rope_theta": 1e4}, "original_max_position_embeddings": 32}),
    "mistral_window": ("mistral", {"sliding_window": 8}),
    "mixtral": ("mixtral", {}),
    "qwen3_moe_dense_layer": ("qwen3_moe", {"mlp_only_layers": [1], "norm_topk_prob": False}),
}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family-ckpts")
    return {
        name: make_tiny_checkpoint(root / name, arch, seed=i, **kw)
        for i, (name, (arch, kw)) in enumerate(CASES.items())
    }


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_hf_model(path)(ids[None]).logits[0]


@pytest.mark.parametrize("backend", ["torch", "torch_batched", "auto"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(checkpoints: dict[str, Path], case: str, backend: str) -> None:
    path = checkpoints[case]
    model, cfg = load_model(path, dtype="float32")
    model.set_backend(backend)
    ids = torch.randint(0, cfg.vocab_size, (29,), generator=torch.Generator().manual_seed(3))
    want = hf_logits(path, ids)
    torch.testing.assert_close(prefill_logits(model, ids, [29]), want, atol=1e-4, rtol=1e-4)
    # chunked prefill (a chunk of one token included) reads the earlier chunks' KV back
    got_chunked = prefill_logits(model, ids, [11, 1, 12, 5])
    torch.testing.assert_close(got_chunked, want, atol=1e-4, rtol=1e-4)


def test_config_reading(checkpoints: dict[str, Path]) -> None:
    _, g2 = load_model(checkpoints["gemma2"])
    assert g2.layer_windows == (8, 0) and g2.attn_softcap == 50.0 and g2.final_softcap == 30.0
    assert g2.hidden_act == "gelu_tanh" and g2.embed_scale == 8.0 and g2.attn_scale == 0.25
    _, g3 = load_model(checkpoints["gemma3"])
    assert g3.qk_norm and g3.rope.rope_type == "linear" and g3.rope_local.theta == 10000.0
    _, phi = load_model(checkpoints["phi3_longrope"])
    assert phi.rope.rope_type == "longrope" and phi.rope.attention_factor > 1.0
    _, moe = load_model(checkpoints["qwen3_moe_dense_layer"])
    assert moe.moe.sparse_layers == (True, False) and not moe.moe.norm_topk_prob


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_longrope_switches_to_long_factors_past_the_original_context(
    checkpoints: dict[str, Path], backend: str
) -> None:
    # 45 tokens > the original 32: transformers uses the long factors for the whole sequence
    path = checkpoints["phi3_longrope"]
    model, cfg = load_model(path, dtype="float32")
    model.set_backend(backend)
    ids = torch.randint(0, cfg.vocab_size, (45,), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(prefill_logits(model, ids, [45]), hf_logits(path, ids), atol=1e-4, rtol=1e-4)
    # and they matter: the short-factor prefix of the same tokens gives other logits
    short = hf_logits(path, ids[:32])
    assert not torch.allclose(prefill_logits(model, ids, [45])[:32], short, atol=1e-3)


@pytest.mark.parametrize("case", list(CASES))
def test_bfloat16_and_int8_close_to_float32(checkpoints: dict[str, Path], case: str) -> None:
    path = checkpoints[case]
    ids = torch.randint(0, 500, (30,), generator=torch.Generator().manual_seed(5))
    ref = prefill_logits(load_model(path, dtype="float32")[0], ids, [30])
    for dtype in ("bfloat16", "int8"):
        model, cfg = load_model(path, dtype=dtype)
        assert model.dtype == torch.bfloat16 and cfg.quantization == (dtype if dtype == "int8" else None)
        got = prefill_logits(model, ids, [20, 10])
        # mean, not max: in MoE models a perturbed router may send a token to another expert
        assert (got - ref).abs().mean() < 0.1 * ref.abs().mean(), dtype
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8, dtype
