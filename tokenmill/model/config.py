"""The model facts tokenmill needs, read from a checkpoint's ``config.json``.

``ModelConfig`` is the only description of a model that the executor and the
model code see; it is parsed once from the Hugging Face config (and
``generation_config.json`` for extra EOS ids) and refuses what the model code
cannot run yet, with an error that says why. The fields every decoder shares
are read here; each family's file (``registry.FAMILIES``) reads its own
(soft-capping, per-head norms, experts...) and checks what it cannot run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
SUPPORTED_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}

# Weight-only quantized dtypes -> the dtype of activations and KV cache they run with.
# bf16 activations: the GEMM converts x rows to fp32 anyway, and a bf16 KV cache halves
# attention's bytes against fp32.
QUANTIZED_DTYPES: dict[str, torch.dtype] = {"int8": torch.bfloat16}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, whichever of the config spellings they came in.

    ``longrope`` (Phi-3) rescales each frequency by ``short_factor`` while a
    sequence is at most ``original_max_position_embeddings`` long and by
    ``long_factor`` beyond, and multiplies cos / sin by ``attention_factor``.
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0


@dataclass(frozen=True)
class MoeConfig:
    """A sparse mixture-of-experts MLP: a router picks ``top_k`` of ``num_experts`` per token."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of one expert
    norm_topk_prob: bool  # renormalise the top-k routing weights to sum to 1
    sparse_layers: tuple[bool, ...]  # per layer: experts (True) or the dense MLP
    # Qwen3-MoE casts the routing weights to the activations' dtype; Mixtral keeps fp32
    round_weights: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of one decoder-only checkpoint."""

    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections
    o_proj_bias: bool
    mlp_bias: bool
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    # weight-only quantization of the linear layers ("int8") or None; ``dtype`` is then
    # the activations' and KV cache's dtype
    quantization: str | None = None
    hidden_act: str = "silu"  # the gated MLP's activation: "silu" or "gelu_tanh" (GeGLU)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3)
    # Gemma: RMSNorm scales by (1 + w); the loader folds the offset into the weights
    norm_weight_offset: float = 0.0
    # Gemma 2/3: the attention and MLP outputs are normed before the residual add
    sandwich_norm: bool = False
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden_size)
    attn_scale: float | None = None  # softmax scale; None: head_dim ** -0.5
    attn_softcap: float = 0.0  # scores -> cap * tanh(scores / cap); 0: off
    final_softcap: float = 0.0  # the same on the logits
    # per layer: keys a query may attend back over (itself included); 0: the whole context
    layer_windows: tuple[int, ...] = ()
    rope_local: RopeConfig | None = None  # sliding-window layers' rotary (Gemma 3)
    moe: MoeConfig | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def softmax_scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def window(self, layer: int) -> int:
        return self.layer_windows[layer] if self.layer_windows else 0


def resolve_dtype(dtype: str | torch.dtype, config_dtype: str | None) -> torch.dtype:
    """Map a ``dtype`` argument ("auto" takes the checkpoint's own) to a torch dtype.

    A weight-only quantized dtype ("int8") maps to the dtype its activations use.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in QUANTIZED_DTYPES:
        return QUANTIZED_DTYPES[dtype]
    name = dtype
    if dtype == "auto":
        name = config_dtype or "float32"
    name = name.removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(
            f"unsupported dtype {dtype!r}; use 'auto', 'float32', 'bfloat16', 'float16' or 'int8'"
        )
    return _DTYPES[name]


def weight_quantization(dtype: str | torch.dtype) -> str | None:
    """The weight-only quantization a ``dtype`` argument asks for ("int8"), else None."""
    return dtype if isinstance(dtype, str) and dtype in QUANTIZED_DTYPES else None


def rope_params(hf: dict[str, Any]) -> dict[str, Any]:
    """The rotary parameters of a config, merged from either spelling.

    Older configs: top-level ``rope_theta`` plus an optional ``rope_scaling`` dict.
    Newer ones fold both into ``rope_parameters``. Either may say "type" or "rope_type".
    """
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    merged = {**scaling, **params}
    merged.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    # either spelling of a partial rotary factor counts (refused below unless 1)
    top_partial = float(hf.get("partial_rotary_factor") or 1.0)
    if top_partial != 1.0:
        merged["partial_rotary_factor"] = top_partial
    if "original_max_position_embeddings" in hf:
        merged.setdefault("original_max_position_embeddings", hf["original_max_position_embeddings"])
    return merged


def parse_rope(merged: dict[str, Any], max_len: int) -> RopeConfig:
    """A ``RopeConfig`` from merged rotary parameters; refuse a type tokenmill cannot run."""
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if float(merged.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    original = merged.get("original_max_position_embeddings")
    short, long, attention_factor = (), (), 1.0
    factor = float(merged.get("factor") or 1.0)
    if rope_type == "longrope":
        if original is None or "short_factor" not in merged or "long_factor" not in merged:
            raise ValueError(
                "longrope needs short_factor, long_factor and original_max_position_embeddings"
            )
        short = tuple(float(f) for f in merged["short_factor"])
        long = tuple(float(f) for f in merged["long_factor"])
        # as transformers: the ratio of context lengths when no factor is given
        if merged.get("factor") is None:
            factor = max_len / int(original)
        attention_factor = merged.get("attention_factor")
        if attention_factor is None:
            attention_factor = (
                1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(int(original)))
            )
    return RopeConfig(
        theta=float(merged.get("rope_theta", 10000.0)),
        rope_type=rope_type,
        factor=factor,
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=None if original is None else int(original),
        short_factor=short,
        long_factor=long,
        attention_factor=float(attention_factor),
    )


def sliding_windows(hf: dict[str, Any], num_layers: int, default: list[bool]) -> tuple[int, ...]:
    """Per-layer sliding windows: ``layer_types`` where the config has it, else ``default``.

    ``default[i]`` says whether layer ``i`` slides when the config does not list
    layer types (each family knows its own pattern). No window (or none shorter
    than the context) gives ``()``: every layer attends to its whole context.
    """
    window = hf.get("sliding_window")
    if not window:
        return ()
    window = int(window)
    types = hf.get("layer_types")
    if types:
        if len(types) != num_layers:
            raise ValueError(f"layer_types lists {len(types)} layers, the model has {num_layers}")
        unknown = set(types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise ValueError(f"layer types {sorted(unknown)} are not supported")
        slides = [t == "sliding_attention" for t in types]
    else:
        slides = default
    max_len = int(hf.get("max_position_embeddings", 2048))
    if window >= max_len or not any(slides):
        return ()
    return tuple(window if s else 0 for s in slides)


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _eos_ids(hf: dict[str, Any], path: Path) -> tuple[int, ...]:
    ids = _as_id_list(hf.get("eos_token_id"))
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        gen = json.loads(gen_path.read_text())
        ids += _as_id_list(gen.get("eos_token_id"))
    return tuple(dict.fromkeys(ids))  # dedupe, keep order


def activation(hf: dict[str, Any], key: str = "hidden_act") -> str:
    """The gated MLP's activation under tokenmill's name; refuse others."""
    act = hf.get(key) or "silu"
    if act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(
            f"{key} {act!r} is not supported (supported: {', '.join(SUPPORTED_ACTIVATIONS)})"
        )
    return SUPPORTED_ACTIVATIONS[act]


def parse_config(hf: dict[str, Any], path: Path, dtype: str | torch.dtype = "auto") -> ModelConfig:
    """Build a ``ModelConfig`` from a parsed ``config.json``; raise ``ValueError`` if unsupported."""
    from tokenmill.model.registry import SUPPORTED_ARCHITECTURES, family

    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"unsupported architecture {archs or hf.get('model_type')!r} in {path}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    num_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = int(hf.get("head_dim") or hidden // num_heads)
    max_len = int(hf.get("max_position_embeddings", 2048))
    qkv_bias = bool(hf.get("attention_bias", False))
    fields: dict[str, Any] = dict(
        architecture=arch,
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=hidden,
        intermediate_size=int(hf.get("intermediate_size") or 0),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        vocab_size=int(hf["vocab_size"]),
        max_model_len=max_len,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=parse_rope(rope_params(hf), max_len),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        o_proj_bias=qkv_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        dtype=resolve_dtype(dtype, hf.get("dtype") or hf.get("torch_dtype")),
        eos_token_ids=_eos_ids(hf, path),
        bos_token_id=hf.get("bos_token_id"),
        quantization=weight_quantization(dtype),
        extra={"model_type": hf.get("model_type")},
    )
    # the family's own fields (and its checks) override the shared reading
    fields.update(family(arch).parse(hf, arch, fields))
    return ModelConfig(**fields)
