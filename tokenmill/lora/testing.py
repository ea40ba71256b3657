"""Seeded random LoRA adapters in PEFT's on-disk format, for tests and benchmarks.

``write_random_adapter`` writes what ``peft``'s ``save_pretrained`` writes for a
LoRA on a Llama-style checkpoint (``adapter_config.json`` and
``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A/B.weight``)
without needing peft or the base weights: only the base's ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_TARGETS = (*_ATTN, "gate_proj", "up_proj", "down_proj")


def module_shapes(hf_config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each adaptable module of a Llama-style config."""
    h = hf_config["hidden_size"]
    heads = hf_config["num_attention_heads"]
    kv = hf_config.get("num_key_value_heads") or heads
    hd = hf_config.get("head_dim") or h // heads
    inter = hf_config["intermediate_size"]
    return {
        "q_proj": (h, heads * hd),
        "k_proj": (h, kv * hd),
        "v_proj": (h, kv * hd),
        "o_proj": (heads * hd, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def write_random_adapter(
    path: str | Path,
    base: str | Path,
    *,
    rank: int = 8,
    alpha: float | None = None,
    targets: tuple[str, ...] = ALL_TARGETS,
    seed: int = 0,
    std: float = 0.05,
) -> Path:
    """Write a LoRA adapter with N(0, ``std``) A and B for the checkpoint at ``base``."""
    from safetensors.torch import save_file

    cfg = json.loads((Path(base) / "config.json").read_text())
    shapes = module_shapes(cfg)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(cfg["num_hidden_layers"]):
        for t in targets:
            fan_in, fan_out = shapes[t]
            part = "self_attn" if t in _ATTN else "mlp"
            prefix = f"base_model.model.model.layers.{i}.{part}.{t}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * std
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": alpha if alpha is not None else 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
