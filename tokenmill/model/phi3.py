"""Phi-3: q/k/v and gate/up already fused in the checkpoint, ``longrope`` scaling.

The fused ``qkv_proj`` and ``gate_up_proj`` are exactly the layout the shared
decoder runs, so they load as they are. A sliding window, when set, applies to
every layer; a partial rotary factor (Phi-4-mini) is refused by the config.
"""

from __future__ import annotations

from typing import Any

from tokenmill.model import llama
from tokenmill.model.config import ModelConfig, activation, sliding_windows

ARCHITECTURES = ("Phi3ForCausalLM",)


def parse(hf: dict[str, Any], arch: str, fields: dict[str, Any]) -> dict[str, Any]:
    n = fields["num_layers"]
    return {
        "hidden_act": activation(hf),
        "attention_bias": False,
        "o_proj_bias": False,
        "layer_windows": sliding_windows(hf, n, [True] * n),
    }


def layer_tensors(cfg: ModelConfig, i: int) -> dict[str, tuple[str, ...]]:
    p = f"model.layers.{i}."
    return {
        **llama.norm_tensors(i),
        "qkv": (p + "self_attn.qkv_proj.weight",),
        "o": (p + "self_attn.o_proj.weight",),
        "gate_up": (p + "mlp.gate_up_proj.weight",),
        "down": (p + "mlp.down_proj.weight",),
    }
