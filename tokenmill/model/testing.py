"""Tiny random checkpoints for tests: a seeded ``transformers`` model saved as safetensors.

Tests across tokenmill (model, executor, engine) need a real checkpoint
directory without downloading anything; ``make_tiny_checkpoint`` writes one
from a transformers config with seeded random weights and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny_hf_config(arch: str = "llama", **overrides: Any):
    """A transformers config for a tiny ``arch`` model ("llama", "qwen2" or "mistral")."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    kwargs = {**TINY_DEFAULTS, **overrides}
    if arch == "mistral":
        kwargs.setdefault("sliding_window", None)
    return classes[arch](**kwargs)


def make_tiny_checkpoint(
    path: str | Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    """Write a seeded random tiny model to ``path`` (config.json + safetensors); return ``path``.

    ``max_shard_size`` (e.g. "20KB") forces a sharded ``model.safetensors.index.json``.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # transformers' default init is small enough that random logits are near-uniform;
    # widen it so greedy choices are well separated and comparisons are meaningful.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
            elif "norm" in name:
                p.normal_(1.0, 0.1)
            else:  # biases
                p.normal_(0.0, 0.1)
    model = model.to(dtype)
    out = Path(path)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **kwargs)
    return out


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """The transformers reference model for a checkpoint directory (eager attention, eval)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    return model.eval()
