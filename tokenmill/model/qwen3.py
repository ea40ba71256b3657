"""Qwen3: the Llama layout plus a per-head RMSNorm of q and k before RoPE, no q/k/v bias."""

from __future__ import annotations

from typing import Any

from tokenmill.model import llama
from tokenmill.model.config import ModelConfig, activation

ARCHITECTURES = ("Qwen3ForCausalLM",)


def parse(hf: dict[str, Any], arch: str, fields: dict[str, Any]) -> dict[str, Any]:
    qkv_bias = bool(hf.get("attention_bias", False))
    return {
        "hidden_act": activation(hf),
        "qk_norm": True,
        "attention_bias": qkv_bias,
        "o_proj_bias": qkv_bias,
        "layer_windows": llama.qwen_windows(hf, fields["num_layers"]),
    }


def qk_norm_tensors(i: int) -> dict[str, tuple[str, ...]]:
    a = f"model.layers.{i}.self_attn."
    return {"q_norm": (a + "q_norm.weight",), "k_norm": (a + "k_norm.weight",)}


def layer_tensors(cfg: ModelConfig, i: int) -> dict[str, tuple[str, ...]]:
    return {**llama.layer_tensors(cfg, i), **qk_norm_tensors(i)}
