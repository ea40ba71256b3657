"""The Llama / Qwen2 / Mistral decoder family in plain PyTorch, over a paged KV cache.

One forward pass takes the flattened tokens of a whole mixed batch (prefill
chunks and decodes together, no padding): ``input_ids [T]``, ``positions [T]``,
one KV-cache tensor per layer and the ``AttentionMetadata`` that says which
rows belong to which sequence. It returns hidden states ``[T, hidden]``;
``compute_logits`` runs the LM head on the rows that sample only.

q/k/v and gate/up projections are fused at load time so each layer runs four
matrix products; the primitive ops come from ``backend.select_ops``.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.model.attention import AttentionMetadata
from tokenmill.model.backend import TorchOps, select_ops
from tokenmill.model.config import ModelConfig
from tokenmill.model.rope import cos_sin_cache


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class DecoderLayer(nn.Module):
    """Weights of one decoder layer: fused qkv, o, fused gate|up, down, two norms."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.input_norm = _param(weights["input_norm"])
        self.qkv_weight = _param(weights["qkv_weight"])
        self.qkv_bias = _param(weights["qkv_bias"]) if "qkv_bias" in weights else None
        self.o_weight = _param(weights["o_weight"])
        self.o_bias = _param(weights["o_bias"]) if "o_bias" in weights else None
        self.post_norm = _param(weights["post_norm"])
        self.gate_up_weight = _param(weights["gate_up_weight"])
        self.gate_up_bias = _param(weights["gate_up_bias"]) if "gate_up_bias" in weights else None
        self.down_weight = _param(weights["down_weight"])
        self.down_bias = _param(weights["down_bias"]) if "down_bias" in weights else None


class LlamaModel(nn.Module):
    """A Llama-family causal LM over a paged KV cache."""

    def __init__(
        self,
        config: ModelConfig,
        embed: torch.Tensor,
        layers: list[DecoderLayer],
        final_norm: torch.Tensor,
        lm_head: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = _param(embed)
        self.layers = nn.ModuleList(layers)
        self.final_norm = _param(final_norm)
        self.lm_head = _param(lm_head) if lm_head is not None else None  # None: tied to embed
        self.register_buffer(
            "cos_sin",
            cos_sin_cache(config.rope, config.head_dim, config.max_model_len).to(embed.device),
            persistent=False,
        )
        self.scale = config.head_dim**-0.5
        self.ops: TorchOps = select_ops(embed.device, embed.dtype)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    def set_backend(self, prefer: str) -> None:
        """Switch primitive ops: "auto", "torch" (reference) or "cpu_kernels"."""
        self.ops = select_ops(self.device, self.dtype, prefer)

    @classmethod
    def from_state_dict(
        cls, config: ModelConfig, state: dict[str, torch.Tensor], device: torch.device
    ) -> LlamaModel:
        """Build from Hugging Face parameter names (``model.layers.{i}.self_attn.q_proj.weight``...)."""

        def take(name: str) -> torch.Tensor:
            if name not in state:
                raise KeyError(f"checkpoint is missing tensor {name!r}")
            return state[name]

        def maybe(name: str) -> torch.Tensor | None:
            return state.get(name)

        layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            w = {
                "input_norm": take(p + "input_layernorm.weight"),
                "post_norm": take(p + "post_attention_layernorm.weight"),
                "qkv_weight": torch.cat(
                    [
                        take(a + "q_proj.weight"),
                        take(a + "k_proj.weight"),
                        take(a + "v_proj.weight"),
                    ]
                ),
                "o_weight": take(a + "o_proj.weight"),
                "gate_up_weight": torch.cat(
                    [take(m + "gate_proj.weight"), take(m + "up_proj.weight")]
                ),
                "down_weight": take(m + "down_proj.weight"),
            }
            if maybe(a + "q_proj.bias") is not None:
                w["qkv_bias"] = torch.cat(
                    [take(a + "q_proj.bias"), take(a + "k_proj.bias"), take(a + "v_proj.bias")]
                )
            if maybe(a + "o_proj.bias") is not None:
                w["o_bias"] = take(a + "o_proj.bias")
            if maybe(m + "gate_proj.bias") is not None:
                w["gate_up_bias"] = torch.cat(
                    [take(m + "gate_proj.bias"), take(m + "up_proj.bias")]
                )
                w["down_bias"] = take(m + "down_proj.bias")
            layers.append(DecoderLayer({k: v.to(device).contiguous() for k, v in w.items()}))

        embed = take("model.embed_tokens.weight").to(device).contiguous()
        lm_head = None
        if not config.tie_word_embeddings:
            if "lm_head.weight" not in state:
                raise KeyError(
                    "checkpoint has no 'lm_head.weight' and tie_word_embeddings is false"
                )
            lm_head = state["lm_head.weight"].to(device).contiguous()
        final_norm = take("model.norm.weight").to(device).contiguous()
        return cls(config, embed, layers, final_norm, lm_head)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` after the final norm, for ``input_ids [T]``."""
        cfg, ops = self.config, self.ops
        eps = cfg.rms_norm_eps
        t = input_ids.shape[0]
        q_size = cfg.q_size
        residual = self.embed_tokens.index_select(0, input_ids)
        h: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            if h is None:
                x = ops.rms_norm(residual, layer.input_norm, eps)
            else:
                x = ops.add_rms_norm(h, residual, layer.input_norm, eps)
            qkv = ops.linear(x, layer.qkv_weight, layer.qkv_bias)
            ops.rope_write_kv(
                qkv, positions, self.cos_sin, kv_cache, meta.slot_mapping,
                cfg.num_heads, cfg.num_kv_heads,
            )  # fmt: skip
            q = qkv[:, :q_size].view(t, cfg.num_heads, cfg.head_dim)
            attn = ops.attention(q, kv_cache, meta, self.scale).view(t, q_size)
            h = ops.linear(attn, layer.o_weight, layer.o_bias)
            x = ops.add_rms_norm(h, residual, layer.post_norm, eps)
            h = ops.linear(ops.silu_mul(ops.linear(x, layer.gate_up_weight, layer.gate_up_bias)),
                           layer.down_weight, layer.down_bias)  # fmt: skip
        assert h is not None
        return ops.add_rms_norm(h, residual, self.final_norm, eps)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[N, vocab]`` for the selected hidden rows ``[N, hidden]``."""
        head = self.lm_head if self.lm_head is not None else self.embed_tokens
        return self.ops.linear(hidden.contiguous(), head).float()
