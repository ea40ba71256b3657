"""Gemma 2 and Gemma 3 (text): the Llama layout with Gemma's numerics.

What differs from Llama, all of it configuration of the shared decoder:
GeGLU (tanh-approximated GELU gate); embeddings scaled by sqrt(hidden_size);
RMSNorm that scales by ``1 + w`` (folded into the weights at load); a norm
after attention and around the MLP ("sandwich"); softmax scale
``query_pre_attn_scalar ** -0.5``; tanh soft-capping of attention scores and
final logits (Gemma 2); alternating sliding-window and global layers
(Gemma 2: every other layer; Gemma 3: five local to one global), and in
Gemma 3 a per-head q/k RMSNorm and a separate rotary base for the local layers.
"""

from __future__ import annotations

from typing import Any

from tokenmill.model import llama
from tokenmill.model.config import (
    ModelConfig,
    activation,
    parse_rope,
    rope_params,
    sliding_windows,
)

ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")


def parse(hf: dict[str, Any], arch: str, fields: dict[str, Any]) -> dict[str, Any]:
    n = fields["num_layers"]
    gemma3 = arch == "Gemma3ForCausalLM"
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"{arch} with use_bidirectional_attention is not supported")
    act_key = "hidden_activation" if hf.get("hidden_activation") else "hidden_act"
    qkv_bias = bool(hf.get("attention_bias", False))
    if gemma3:
        pattern = int(hf.get("sliding_window_pattern", 6))
        default = [(i + 1) % pattern != 0 for i in range(n)]
    else:
        default = [(i + 1) % 2 == 1 for i in range(n)]
    out: dict[str, Any] = {
        "hidden_act": activation(hf, act_key),
        "attention_bias": qkv_bias,
        "o_proj_bias": qkv_bias,
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "norm_weight_offset": 1.0,
        "sandwich_norm": True,
        "embed_scale": fields["hidden_size"] ** 0.5,
        "attn_scale": float(hf.get("query_pre_attn_scalar", fields["head_dim"])) ** -0.5,
        "attn_softcap": float(hf.get("attn_logit_softcapping") or 0.0),
        "final_softcap": float(hf.get("final_logit_softcapping") or 0.0),
        "layer_windows": sliding_windows(hf, n, default),
    }
    if gemma3:
        out["qk_norm"] = True
        out["rope"], out["rope_local"] = _gemma3_ropes(hf, fields["max_model_len"])
    return out


def _gemma3_ropes(hf: dict[str, Any], max_len: int):
    """(global, local) rotary: per layer type in ``rope_parameters``, or the older spelling."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = {"rope_theta": 1_000_000.0, **(params.get("full_attention") or {})}
        local = {"rope_theta": 10_000.0, **(params.get("sliding_attention") or {})}
    else:
        full = rope_params({**hf, "rope_theta": hf.get("rope_theta", 1_000_000.0)})
        local = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
    return parse_rope(full, max_len), parse_rope(local, max_len)


def layer_tensors(cfg: ModelConfig, i: int) -> dict[str, tuple[str, ...]]:
    p = f"model.layers.{i}."
    names = {
        "input_norm": (p + "input_layernorm.weight",),
        "post_attn_norm": (p + "post_attention_layernorm.weight",),
        "post_norm": (p + "pre_feedforward_layernorm.weight",),
        "post_mlp_norm": (p + "post_feedforward_layernorm.weight",),
        **llama.attention_tensors(i),
        **llama.mlp_tensors(p + "mlp."),
    }
    if cfg.qk_norm:
        a = p + "self_attn."
        names.update(q_norm=(a + "q_norm.weight",), k_norm=(a + "k_norm.weight",))
    return names
