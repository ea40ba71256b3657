"""The Llama / Qwen2 / Mistral decoder family in plain PyTorch, over a paged KV cache.

One forward pass takes the flattened tokens of a whole mixed batch (prefill
chunks and decodes together, no padding): ``input_ids [T]``, ``positions [T]``,
one KV-cache tensor per layer and the ``AttentionMetadata`` that says which
rows belong to which sequence. It returns hidden states ``[T, hidden]``;
``compute_logits`` runs the LM head on the rows that sample only.

q/k/v and gate/up projections are fused at load time so each layer runs four
matrix products. The primitive ops come from ``backend.select_ops``, which
also decides the weights' layout (``Linear``); with ``config.quantization``
("int8") every linear layer, the LM head included, is quantized there. Weights live in plain
attributes rather than ``nn.Parameter``s: nothing here trains, and the hot
loop reads them thirty times a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.model.attention import AttentionMetadata
from tokenmill.model.backend import Linear, TorchOps, select_ops
from tokenmill.model.config import ModelConfig
from tokenmill.model.rope import cos_sin_cache


@dataclass(slots=True)
class DecoderLayer:
    """Weights of one decoder layer: fused qkv, o, fused gate|up, down, two norms."""

    input_norm: torch.Tensor
    qkv: Linear
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear


class LlamaModel:
    """A Llama-family causal LM over a paged KV cache."""

    def __init__(
        self,
        config: ModelConfig,
        dense: dict[str, torch.Tensor],
        device: torch.device,
        prefer: str = "auto",
    ) -> None:
        self.config = config
        self.device = device
        self.dtype = dense["embed"].dtype
        self.embed_tokens = dense["embed"]
        self.final_norm = dense["final_norm"]
        self.cos_sin = cos_sin_cache(config.rope, config.head_dim, config.max_model_len).to(device)
        self.scale = config.head_dim**-0.5
        self._dense = dense  # kept only until _prepare() lays the weights out
        self._prepare(select_ops(device, self.dtype, prefer, config.head_dim))

    def _prepare(self, ops: TorchOps) -> None:
        d, cfg = self._dense, self.config
        self.ops = ops
        quant = cfg.quantization

        def linear(name: str) -> Linear:
            return ops.prepare_linear(d[name], d.get(f"{name}_bias"), quant)

        def gate_up(name: str) -> Linear:
            return ops.prepare_gate_up(d[name], d.get(f"{name}_bias"), quant)

        self.layers = [
            DecoderLayer(
                input_norm=d[f"{i}.input_norm"],
                qkv=linear(f"{i}.qkv"),
                o=linear(f"{i}.o"),
                post_norm=d[f"{i}.post_norm"],
                gate_up=gate_up(f"{i}.gate_up"),
                down=linear(f"{i}.down"),
            )
            for i in range(cfg.num_layers)
        ]
        # a tied, quantized head is rounded from the full-precision embedding ("lm_head_fp32")
        head = d.get("lm_head", d.get("lm_head_fp32", self.embed_tokens))
        self.lm_head = ops.prepare_linear(head, None, quant)
        self._dense = {}

    def set_backend(self, prefer: str) -> None:
        """Switch primitive ops: one of ``backend.BACKENDS`` ("torch" is the reference)."""
        self._dense = self.dense_weights()
        self._prepare(select_ops(self.device, self.dtype, prefer, self.config.head_dim))

    def dense_weights(self) -> dict[str, torch.Tensor]:
        """Every weight in plain ``[out, in]`` form, keyed ``"{layer}.{name}"`` (and "embed"...)."""
        out = {"embed": self.embed_tokens, "final_norm": self.final_norm}
        if not self.config.tie_word_embeddings:
            out["lm_head"] = self.lm_head.dense_weight()
        elif self.config.quantization:
            out["lm_head_fp32"] = self.lm_head.dense_weight()  # re-quantizes to the same values
        for i, layer in enumerate(self.layers):
            out[f"{i}.input_norm"] = layer.input_norm
            out[f"{i}.post_norm"] = layer.post_norm
            for name in ("qkv", "o", "gate_up", "down"):
                lin: Linear = getattr(layer, name)
                out[f"{i}.{name}"] = lin.dense_weight()
                if lin.bias is not None:
                    out[f"{i}.{name}_bias"] = lin.dense_bias()
        return out

    @classmethod
    def from_state_dict(
        cls,
        config: ModelConfig,
        state: dict[str, torch.Tensor],
        device: torch.device,
        prefer: str = "auto",
    ) -> LlamaModel:
        """Build from Hugging Face parameter names (``model.layers.{i}.self_attn.q_proj.weight``...)."""

        def take(name: str) -> torch.Tensor:
            if name not in state:
                raise KeyError(f"checkpoint is missing tensor {name!r}")
            return state.pop(name)  # pop: each tensor is moved / fused once, then freed

        def cat(*names: str) -> torch.Tensor:
            return torch.cat([take(n) for n in names])

        dense: dict[str, torch.Tensor] = {}
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            dense[f"{i}.input_norm"] = take(p + "input_layernorm.weight")
            dense[f"{i}.post_norm"] = take(p + "post_attention_layernorm.weight")
            dense[f"{i}.qkv"] = cat(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight")
            dense[f"{i}.o"] = take(a + "o_proj.weight")
            dense[f"{i}.gate_up"] = cat(m + "gate_proj.weight", m + "up_proj.weight")
            dense[f"{i}.down"] = take(m + "down_proj.weight")
            if a + "q_proj.bias" in state:
                dense[f"{i}.qkv_bias"] = cat(
                    a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"
                )
            if a + "o_proj.bias" in state:
                dense[f"{i}.o_bias"] = take(a + "o_proj.bias")
            if m + "gate_proj.bias" in state:
                dense[f"{i}.gate_up_bias"] = cat(m + "gate_proj.bias", m + "up_proj.bias")
                dense[f"{i}.down_bias"] = take(m + "down_proj.bias")
        dense["embed"] = take("model.embed_tokens.weight")
        dense["final_norm"] = take("model.norm.weight")
        if not config.tie_word_embeddings:
            if "lm_head.weight" not in state:
                raise KeyError(
                    "checkpoint has no 'lm_head.weight' and tie_word_embeddings is false"
                )
            dense["lm_head"] = take("lm_head.weight")
        if config.quantization:
            # linear weights stay in the checkpoint's precision until quantized; the rest
            # (norms, biases, embedding) run in the activations' dtype
            linears = ("qkv", "o", "gate_up", "down", "lm_head", "lm_head_fp32")
            if config.tie_word_embeddings:
                dense["lm_head_fp32"] = dense["embed"]
            dense = {
                k: v if k.rsplit(".", 1)[-1] in linears else v.to(config.dtype)
                for k, v in dense.items()
            }
        dense = {k: v.to(device).contiguous() for k, v in dense.items()}
        return cls(config, dense, device, prefer)

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
        cos_sin, slots, scale = self.cos_sin, meta.slot_mapping, self.scale
        residual = self.embed_tokens.index_select(0, input_ids)
        h: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            if h is None:
                x = ops.rms_norm(residual, layer.input_norm, eps)
            else:
                x = ops.add_rms_norm(h, residual, layer.input_norm, eps)
            qkv = ops.linear(x, layer.qkv)
            ops.rope_write_kv(
                qkv, positions, cos_sin, kv_cache, slots, cfg.num_heads, cfg.num_kv_heads
            )
            q = qkv[:, :q_size].view(t, cfg.num_heads, cfg.head_dim)
            h = ops.linear(ops.attention(q, kv_cache, meta, scale).view(t, q_size), layer.o)
            x = ops.add_rms_norm(h, residual, layer.post_norm, eps)
            h = ops.linear(ops.gate_up_silu(x, layer.gate_up), layer.down)
        assert h is not None
        return ops.add_rms_norm(h, residual, self.final_norm, eps)

    __call__ = forward

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[N, vocab]`` for the selected hidden rows ``[N, hidden]``."""
        return self.ops.linear(hidden.contiguous(), self.lm_head).float()
