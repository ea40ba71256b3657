"""Mixtral: Mistral attention, and a sparse MLP of ``num_local_experts`` SwiGLU experts.

The router's softmax over all experts picks ``num_experts_per_tok`` per token
and renormalises their weights to sum to one (always: Mixtral has no
``norm_topk_prob`` switch). Expert ``e`` of layer ``i`` is ``w1`` (gate),
``w3`` (up), ``w2`` (down) under ``block_sparse_moe.experts.{e}``.
"""

from __future__ import annotations

from typing import Any

from tokenmill.model import llama
from tokenmill.model.config import ModelConfig, MoeConfig, activation, sliding_windows

ARCHITECTURES = ("MixtralForCausalLM",)


def parse(hf: dict[str, Any], arch: str, fields: dict[str, Any]) -> dict[str, Any]:
    n = fields["num_layers"]
    moe = MoeConfig(
        num_experts=int(hf["num_local_experts"]),
        top_k=int(hf.get("num_experts_per_tok", 2)),
        intermediate_size=int(hf["intermediate_size"]),
        norm_topk_prob=True,
        sparse_layers=(True,) * n,
    )
    return {
        "hidden_act": activation(hf),
        "attention_bias": False,
        "o_proj_bias": False,
        "layer_windows": sliding_windows(hf, n, [True] * n),
        "moe": moe,
    }


def layer_tensors(cfg: ModelConfig, i: int) -> dict[str, tuple[str, ...]]:
    p = f"model.layers.{i}."
    return {
        **llama.norm_tensors(i),
        **llama.attention_tensors(i),
        "router": (p + "block_sparse_moe.gate.weight",),
    }


def expert_tensors(cfg: ModelConfig, i: int, e: int) -> dict[str, tuple[str, ...]]:
    x = f"model.layers.{i}.block_sparse_moe.experts.{e}."
    return {"gate_up": (x + "w1.weight", x + "w3.weight"), "down": (x + "w2.weight",)}
