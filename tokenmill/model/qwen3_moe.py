"""Qwen3-MoE: Qwen3 attention (per-head q/k norm) and sparse MLPs of SwiGLU experts.

A layer is sparse unless listed in ``mlp_only_layers`` or off the
``decoder_sparse_step`` stride; dense layers keep an ordinary MLP. The top-k
routing weights are renormalised only with ``norm_topk_prob``, and are
rounded to the activations' dtype before they scale the experts' outputs.
"""

from __future__ import annotations

from typing import Any

from tokenmill.model import llama, qwen3
from tokenmill.model.config import ModelConfig, MoeConfig, activation, sliding_windows

ARCHITECTURES = ("Qwen3MoeForCausalLM",)


def parse(hf: dict[str, Any], arch: str, fields: dict[str, Any]) -> dict[str, Any]:
    n = fields["num_layers"]
    if hf.get("shared_expert_intermediate_size"):
        raise ValueError(f"{arch} with a shared expert is not supported")
    # transformers 5 writes "num_local_experts", released checkpoints "num_experts"
    num_experts = int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
    dense_only = set(hf.get("mlp_only_layers") or [])
    step = int(hf.get("decoder_sparse_step", 1))
    sparse = tuple(
        i not in dense_only and num_experts > 0 and (i + 1) % step == 0 for i in range(n)
    )
    moe = MoeConfig(
        num_experts=num_experts,
        top_k=int(hf.get("num_experts_per_tok", 8)),
        intermediate_size=int(hf["moe_intermediate_size"]),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        sparse_layers=sparse,
        round_weights=True,
    )
    qkv_bias = bool(hf.get("attention_bias", False))
    windows = sliding_windows(hf, n, [True] * n) if hf.get("use_sliding_window") else ()
    return {
        "hidden_act": activation(hf),
        "qk_norm": True,
        "attention_bias": qkv_bias,
        "o_proj_bias": qkv_bias,
        "layer_windows": windows,
        "moe": moe if any(sparse) else None,
    }


def layer_tensors(cfg: ModelConfig, i: int) -> dict[str, tuple[str, ...]]:
    p = f"model.layers.{i}."
    names = {**llama.norm_tensors(i), **llama.attention_tensors(i), **qwen3.qk_norm_tensors(i)}
    if cfg.moe is not None and cfg.moe.sparse_layers[i]:
        names["router"] = (p + "mlp.gate.weight",)
    else:
        names.update(llama.mlp_tensors(p + "mlp."))
    return names


def expert_tensors(cfg: ModelConfig, i: int, e: int) -> dict[str, tuple[str, ...]]:
    x = f"model.layers.{i}.mlp.experts.{e}."
    return {"gate_up": (x + "gate_proj.weight", x + "up_proj.weight"), "down": (x + "down_proj.weight",)}
