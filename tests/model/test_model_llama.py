"""Logits of tokenmill's Llama-family models against transformers on tiny random checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenmill.model import load_model
from tokenmill.model.testing import load_hf_model, make_tiny_checkpoint
from tokenmill.model.testing import prefill_logits as run_chunks

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

CASES = {
    "llama": ("llama", {}),
    "llama_tied_bias": ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    "qwen2_tied": ("qwen2", {"tie_word_embeddings": True}),
    "mistral_mqa": ("mistral", {"num_key_value_heads": 1, "vocab_size": 300}),
    "llama_rope_llama3": ("llama", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}),
    "llama_rope_linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama-ckpts")
    return {
        name: make_tiny_checkpoint(root / name, arch, seed=i, **kw)
        for i, (name, (arch, kw)) in enumerate(CASES.items())
    }


@pytest.mark.parametrize("backend", ["torch", "torch_batched", "auto"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(checkpoints: dict[str, Path], case: str, backend: str) -> None:
    path = checkpoints[case]
    model, cfg = load_model(path, dtype="float32")
    model.set_backend(backend)
    hf = load_hf_model(path)
    ids = torch.randint(0, cfg.vocab_size, (45,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
    got = run_chunks(model, ids, [45])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # chunked prefill (a chunk of one token included) reads the earlier chunks' KV from the cache
    got_chunked = run_chunks(model, ids, [17, 1, 20, 7])
    torch.testing.assert_close(got_chunked, want, atol=1e-4, rtol=1e-4)


def test_rope_scaling_is_applied(checkpoints: dict[str, Path]) -> None:
    # the same weights with and without the rope scaling must give different logits
    scaled, _ = load_model(checkpoints["llama_rope_linear"])
    plain_cfg = scaled.config.rope.__class__(theta=scaled.config.rope.theta)
    from tokenmill.model.rope import cos_sin_cache

    ids = torch.arange(10, 50)
    want = run_chunks(scaled, ids, [40])
    scaled.cos_sin = cos_sin_cache(plain_cfg, scaled.config.head_dim, scaled.config.max_model_len)
    assert not torch.allclose(run_chunks(scaled, ids, [40]), want, atol=1e-3)


def test_bfloat16_close_to_float32(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["qwen2_tied"]
    m32, _ = load_model(path, dtype="float32")
    m16, cfg = load_model(path, dtype="bfloat16")
    assert cfg.dtype == torch.bfloat16 and m16.dtype == torch.bfloat16
    ids = torch.randint(0, cfg.vocab_size, (30,), generator=torch.Generator().manual_seed(5))
    a = run_chunks(m32, ids, [30])
    b = run_chunks(m16, ids, [20, 10])
    assert (a - b).abs().max() < 0.1 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8
