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


# per family: the transformers config class and what a tiny model of it needs besides
# TINY_DEFAULTS (MoE: 4 experts of 32, top-2; Phi-3: longrope with a 64-token original context)
TINY_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32}),
    "qwen3_moe": ("Qwen3MoeConfig", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True,
    }),
}  # fmt: skip


def tiny_hf_config(arch: str = "llama", **overrides: Any):
    """A transformers config for a tiny ``arch`` model (a key of ``TINY_FAMILIES``)."""
    import transformers

    cls, family_defaults = TINY_FAMILIES[arch]
    kwargs = {**TINY_DEFAULTS, **family_defaults, **overrides}
    return getattr(transformers, cls)(**kwargs)


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


def prefill_logits(model, ids: torch.Tensor, chunks: list[int], block_size: int = 8) -> torch.Tensor:
    """Prefill ``ids`` in the given chunk sizes over a shuffled block table; logits of every row.

    Later chunks read the earlier chunks' KV back from the paged cache, so this
    exercises the cache as a serving engine does.
    """
    from tokenmill.model.attention import AttentionMetadata, kv_cache_shape

    cfg = model.config
    num_blocks = (len(ids) + block_size - 1) // block_size + 8
    kv = [
        torch.zeros(
            kv_cache_shape(num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim),
            dtype=model.dtype,
        )
        for _ in range(cfg.num_layers)
    ]
    table = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(7)).to(torch.int32)
    table = table[: (len(ids) + block_size - 1) // block_size]
    out, start = [], 0
    for n in chunks:
        pos = torch.arange(start, start + n)
        slots = table.long()[pos // block_size] * block_size + pos % block_size
        meta = AttentionMetadata(
            torch.tensor([0, n], dtype=torch.int32), torch.tensor([start + n], dtype=torch.int32),
            table[None], slots, n, start + n,
        )  # fmt: skip
        out.append(model.compute_logits(model(ids[start : start + n], pos, kv, meta)))
        start += n
    return torch.cat(out)

