"""Model shapes for cost models, read from a Hugging Face ``config.json`` dict (no torch).

A cost model needs only the shape of a model: layers, widths, heads, vocabulary
and context length. ``ModelShape.from_hf_config`` reads it from the dict of any
Llama-family ``config.json`` (Llama, Qwen2, Mistral and look-alikes), and a few
well-known shapes are built in by name so that a simulation of a 70B model
needs no checkpoint on disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPE_BYTES = {"fp32": 4, "float32": 4, "tf32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1, "int8": 1}

# Shapes as their config.json files give them (only the fields a cost model reads).
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768),
    "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768),
    "smollm-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                        tie_word_embeddings=True),
}  # fmt: skip


@dataclass(frozen=True)
class ModelShape:
    """What a cost model needs to know about a decoder-only transformer."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str = "") -> ModelShape:
        """Read a Llama-family ``config.json`` dict; refuse shapes this cost model cannot price."""
        for key in ("num_local_experts", "n_routed_experts", "num_experts"):
            if config.get(key):
                raise ValueError(f"mixture-of-experts configs ({key}={config[key]}) are not priced by this cost model yet")
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            shape = cls(
                name=name or str(config.get("_name_or_path") or config.get("model_type") or "model"),
                num_layers=int(config["num_hidden_layers"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab_size=int(config["vocab_size"]),
                max_model_len=int(config.get("max_position_embeddings") or 2048),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks {e.args[0]!r}, which the cost model needs") from None
        return shape

    @classmethod
    def load(cls, spec: str) -> ModelShape:
        """A built-in name (``llama-2-70b``), a ``config.json`` path, or a checkpoint directory."""
        if spec.lower() in KNOWN_MODELS:
            return cls.from_hf_config(KNOWN_MODELS[spec.lower()], name=spec.lower())
        path = Path(spec)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(
                f"model {spec!r} is neither a built-in shape ({', '.join(sorted(KNOWN_MODELS))}) "
                "nor a config.json or a directory holding one"
            )
        return cls.from_hf_config(json.loads(path.read_text()), name=path.parent.name)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def params_per_layer(self) -> int:
        h = self.hidden_size
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        mlp = 3 * h * self.intermediate_size
        return attn + mlp + 2 * h  # two RMSNorm weights

    @property
    def num_params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else emb
        return emb + head + self.num_layers * self.params_per_layer + self.hidden_size

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of K and V over all layers for one token (the whole model, before any sharding)."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes
