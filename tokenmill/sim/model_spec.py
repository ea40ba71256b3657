"""Model shapes for cost models, read from a Hugging Face ``config.json`` dict (no torch).

A cost model needs only the shape of a model: layers, widths, heads, vocabulary
and context length. ``ModelShape.from_hf_config`` reads it from the dict of any
Llama-family ``config.json`` (Llama, Qwen2/3, Mistral, Gemma 2/3, Phi-3 and
look-alikes), and a few well-known shapes are built in by name so that a
simulation of a 70B model needs no checkpoint on disk.

Two things make a layer cheaper than its size says: a mixture-of-experts MLP
(Mixtral, Qwen3-MoE) computes only ``experts_per_token`` of its ``num_experts``
experts per token (``num_active_params``), and a sliding-window layer (Mistral,
Gemma, Phi-3) attends to at most ``sliding_window`` keys. (When every layer
slides, the core gives back the blocks all windows have passed; the KV per
token a block holds is still every layer's.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPE_BYTES = {"fp32": 4, "float32": 4, "tf32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1, "int8": 1}


def kv_value_bytes(kv_dtype: str, head_dim: int) -> float:
    """Bytes per stored K or V value. tokenmill's ``--kv-cache-dtype int8 / int4`` keep an fp16
    scale (int4: and an fp16 zero) per token and head beside the codes (``model/kv_format.py``)."""
    if kv_dtype == "int8":
        return 1.0 + 2.0 / head_dim
    if kv_dtype == "int4":
        return 0.5 + 4.0 / head_dim
    if kv_dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown KV dtype {kv_dtype!r}; use one of int4, {', '.join(DTYPE_BYTES)}")
    return float(DTYPE_BYTES[kv_dtype])

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
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                         max_position_embeddings=32768, num_local_experts=8, num_experts_per_tok=2),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          vocab_size=151936, max_position_embeddings=40960, num_experts=128, num_experts_per_tok=8),
    "gemma-2-9b": dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
                       max_position_embeddings=8192, sliding_window=4096, tie_word_embeddings=True),
}  # fmt: skip


def _moe_fields(config: dict[str, Any], num_layers: int) -> dict[str, int]:
    """Experts, experts per token, expert width and sparse layer count (all 0 for dense)."""
    if config.get("n_routed_experts") or config.get("shared_expert_intermediate_size"):
        raise ValueError("mixture-of-experts configs with shared experts are not priced by this cost model yet")
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    if not experts:
        return {}
    if config.get("model_type") == "mixtral" or "moe_intermediate_size" not in config:
        width, sparse = int(config["intermediate_size"]), num_layers
    else:  # Qwen-MoE: some layers may stay dense
        step = int(config.get("decoder_sparse_step") or 1)
        dense = set(config.get("mlp_only_layers") or [])
        sparse = sum(1 for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
        width = int(config["moe_intermediate_size"])
    return dict(num_experts=experts, experts_per_token=int(config.get("num_experts_per_tok", 2)),
                moe_intermediate_size=width, num_moe_layers=sparse)  # fmt: skip


def _sliding_layers(config: dict[str, Any], num_layers: int) -> tuple[int, int]:
    """(window, layers that slide) as transformers reads the config; (0, 0) when none do."""
    window = int(config.get("sliding_window") or 0)
    kind = config.get("model_type", "")
    if not window or window >= int(config.get("max_position_embeddings") or 2048):
        return 0, 0
    if kind in ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe") and not config.get("use_sliding_window"):
        return 0, 0
    if config.get("layer_types"):
        return window, sum(1 for t in config["layer_types"] if t == "sliding_attention")
    if kind == "gemma2":
        return window, (num_layers + 1) // 2  # every other layer, from the first
    if kind.startswith("gemma3"):
        pattern = int(config.get("sliding_window_pattern") or 6)
        return window, sum(1 for i in range(num_layers) if (i + 1) % pattern)
    if kind in ("qwen2", "qwen3"):
        return window, max(0, num_layers - int(config.get("max_window_layers") or num_layers))
    return window, num_layers


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
    num_experts: int = 0  # mixture of experts: experts per sparse layer (0: dense)
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    num_moe_layers: int = 0  # layers whose MLP is the experts (the rest keep the dense MLP)
    sliding_window: int = 0  # keys a sliding layer attends to (0: none)
    num_sliding_layers: int = 0

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str = "") -> ModelShape:
        """Read a Llama-family ``config.json`` dict; refuse shapes this cost model cannot price."""
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            layers = int(config["num_hidden_layers"])
            window, sliding = _sliding_layers(config, layers)
            shape = cls(
                name=name or str(config.get("_name_or_path") or config.get("model_type") or "model"),
                num_layers=layers,
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab_size=int(config["vocab_size"]),
                max_model_len=int(config.get("max_position_embeddings") or 2048),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                sliding_window=window,
                num_sliding_layers=sliding,
                **_moe_fields(config, layers),
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
    def is_moe(self) -> bool:
        return self.num_experts > 0 and self.num_moe_layers > 0

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - (self.num_moe_layers if self.is_moe else 0)

    @property
    def expert_params(self) -> int:
        """Weights of one expert (gate, up, down)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def params_per_layer(self) -> int:
        """Weights of a dense layer (attention, MLP, two RMSNorms)."""
        return self._attn_params + 3 * self.hidden_size * self.intermediate_size + 2 * self.hidden_size

    @property
    def _attn_params(self) -> int:
        h = self.hidden_size
        return h * self.q_size + 2 * h * self.kv_size + self.q_size * h

    def _layers_params(self, experts: int) -> int:
        moe = self._attn_params + experts * self.expert_params + self.hidden_size * self.num_experts
        moe += 2 * self.hidden_size
        return self.num_dense_layers * self.params_per_layer + (self.num_moe_layers * moe if self.is_moe else 0)

    @property
    def num_params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else emb
        return emb + head + self._layers_params(self.num_experts) + self.hidden_size

    @property
    def num_active_params(self) -> int:
        """Weights one token computes with: a MoE layer's router and its top-k experts only."""
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else emb
        return emb + head + self._layers_params(self.experts_per_token) + self.hidden_size

    def experts_touched(self, tokens: int) -> float:
        """Expected distinct experts a step of ``tokens`` tokens routes to in one sparse layer,
        with routing uniform over experts: ``E (1 - (1 - k / E) ** tokens)``."""
        if not self.is_moe or tokens <= 0:
            return 0.0
        e, k = self.num_experts, self.experts_per_token
        return e * (1.0 - (1.0 - k / e) ** tokens)

    def kv_bytes_per_token(self, dtype_bytes: float = 2) -> float:
        """Bytes of K and V over all layers for one token (the whole model, before any sharding)."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes
