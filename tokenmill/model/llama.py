"""The Llama family (Llama, Mistral, Qwen2): the layout the other families start from.

q/k/v and gate/up are separate tensors in the checkpoint; the loader fuses
them into one ``qkv`` and one ``gate_up`` matrix per layer. Qwen2 biases q/k/v
only; Llama's ``attention_bias`` covers o_proj too. Mistral slides every
layer's attention window when ``sliding_window`` is set; Qwen2 only above
``max_window_layers``, and only with ``use_sliding_window``.
"""

from __future__ import annotations

from typing import Any

from tokenmill.model.config import ModelConfig, activation, sliding_windows

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def parse(hf: dict[str, Any], arch: str, fields: dict[str, Any]) -> dict[str, Any]:
    n = fields["num_layers"]
    qwen = arch == "Qwen2ForCausalLM"
    qkv_bias = bool(hf.get("attention_bias", qwen))
    return {
        "hidden_act": activation(hf),
        "attention_bias": qkv_bias,
        "o_proj_bias": qkv_bias and not qwen,
        "layer_windows": qwen_windows(hf, n) if qwen else sliding_windows(hf, n, [True] * n),
    }


def qwen_windows(hf: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    """Qwen2/3: windows only with ``use_sliding_window``, on layers from ``max_window_layers``."""
    if not hf.get("use_sliding_window", False):
        return ()
    first = int(hf.get("max_window_layers", num_layers))
    return sliding_windows(hf, num_layers, [i >= first for i in range(num_layers)])


def attention_tensors(i: int) -> dict[str, tuple[str, ...]]:
    """q/k/v/o of layer ``i`` (names ending ``_bias`` are optional)."""
    a = f"model.layers.{i}.self_attn."
    return {
        "qkv": (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
        "qkv_bias": (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
        "o": (a + "o_proj.weight",),
        "o_bias": (a + "o_proj.bias",),
    }


def mlp_tensors(prefix: str) -> dict[str, tuple[str, ...]]:
    """A gated MLP's gate|up and down under ``prefix`` ("model.layers.3.mlp.")."""
    return {
        "gate_up": (prefix + "gate_proj.weight", prefix + "up_proj.weight"),
        "gate_up_bias": (prefix + "gate_proj.bias", prefix + "up_proj.bias"),
        "down": (prefix + "down_proj.weight",),
        "down_bias": (prefix + "down_proj.bias",),
    }


def norm_tensors(i: int) -> dict[str, tuple[str, ...]]:
    p = f"model.layers.{i}."
    return {
        "input_norm": (p + "input_layernorm.weight",),
        "post_norm": (p + "post_attention_layernorm.weight",),
    }


def layer_tensors(cfg: ModelConfig, i: int) -> dict[str, tuple[str, ...]]:
    return {**norm_tensors(i), **attention_tensors(i), **mlp_tensors(f"model.layers.{i}.mlp.")}
