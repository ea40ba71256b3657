"""The model facts tokenmill needs, read from a checkpoint's ``config.json``.

``ModelConfig`` is the only description of a model that the executor and the
model code see; it is parsed once from the Hugging Face config (and
``generation_config.json`` for extra EOS ids) and refuses what the model code
cannot run yet, with an error that says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# architecture name in config.json -> attention projections with bias by default
SUPPORTED_ARCHITECTURES: dict[str, bool] = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": True,
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

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
    """Rotary embedding parameters, whichever of the two config spellings they came in."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of one Llama-family checkpoint."""

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
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


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


def _rope_config(hf: dict[str, Any]) -> RopeConfig:
    # Older configs: top-level ``rope_theta`` plus an optional ``rope_scaling`` dict.
    # Newer ones fold both into ``rope_parameters``. Either key may use "type" or "rope_type".
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if float(merged.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=merged.get("original_max_position_embeddings"),
    )


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


def parse_config(hf: dict[str, Any], path: Path, dtype: str | torch.dtype = "auto") -> ModelConfig:
    """Build a ``ModelConfig`` from a parsed ``config.json``; raise ``ValueError`` if unsupported."""
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"unsupported architecture {archs or hf.get('model_type')!r} in {path}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")

    max_len = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", arch == "MistralForCausalLM")
    if uses_window and window is not None and int(window) < max_len:
        raise ValueError(
            f"{arch} with sliding_window={window} < max_position_embeddings={max_len} is not "
            "supported yet (sliding-window attention is not implemented)"
        )

    num_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = int(hf.get("head_dim") or hidden // num_heads)
    qkv_bias = bool(hf.get("attention_bias", SUPPORTED_ARCHITECTURES[arch]))
    return ModelConfig(
        architecture=arch,
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        vocab_size=int(hf["vocab_size"]),
        max_model_len=max_len,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=_rope_config(hf),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        # Qwen2 biases q/k/v only; Llama's ``attention_bias`` covers o_proj too.
        o_proj_bias=qkv_bias and arch != "Qwen2ForCausalLM",
        mlp_bias=bool(hf.get("mlp_bias", False)),
        dtype=resolve_dtype(dtype, hf.get("dtype") or hf.get("torch_dtype")),
        eos_token_ids=_eos_ids(hf, path),
        bos_token_id=hf.get("bos_token_id"),
        quantization=weight_quantization(dtype),
        extra={"model_type": hf.get("model_type")},
    )
