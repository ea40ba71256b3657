"""The decoder every supported family runs, in plain PyTorch over a paged KV cache.

One forward pass takes the flattened tokens of a whole mixed batch (prefill
chunks and decodes together, no padding): ``input_ids [T]``, ``positions [T]``,
one KV-cache tensor per layer and the ``AttentionMetadata`` that says which
rows belong to which sequence. It returns hidden states ``[T, hidden]``;
``compute_logits`` runs the LM head on the rows that sample only.

A layer is RMSNorm -> attention -> RMSNorm -> gated MLP with residual adds; the
families differ only in options of that one network (``ModelConfig``): q/k
per-head norms, "sandwich" norms around attention and MLP (Gemma), GeGLU,
soft-capping, sliding windows per layer, a second rotary table for the local
layers, longrope, and a sparse mixture-of-experts MLP (``moe.MoeBlock``). Each
family's file only names its checkpoint tensors (``registry``).

q/k/v and gate/up projections are fused at load time so each layer runs four
matrix products. The primitive ops come from ``backend.select_ops``, which
also decides the weights' layout (``Linear``); with ``config.quantization``
("int8") every linear layer, the LM head and the experts included, is
quantized there. Weights live in plain attributes rather than
``nn.Parameter``s: nothing here trains, and the hot loop reads them thirty
times a step.

LoRA: ``forward(..., lora=batch)`` adds each row's adapter to the dense linear
layers it adapts (``ops.lora_apply`` after each GEMM; ``lora.batch``). A gated
MLP that an adapter of the batch touches runs its ``[gate; up]`` GEMM without
the fused activation, so that the adapter's share lands before SiLU; layers
and steps without adapters run exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokenmill.model.attention import AttentionMetadata
from tokenmill.model.backend import Linear, TorchOps, select_ops
from tokenmill.model.config import ModelConfig
from tokenmill.model.moe import ExpertSource, MoeBlock
from tokenmill.model.rope import cos_sin_cache, rope_positions

if TYPE_CHECKING:
    from tokenmill.lora.batch import LoraBatch

# the linear layers of ``dense`` (quantized with ``config.quantization``; the rest is cast)
LINEAR_KEYS = ("qkv", "o", "gate_up", "down", "lm_head", "lm_head_fp32")


@dataclass(slots=True)
class DecoderLayer:
    """Weights of one decoder layer: fused qkv, o, the MLP (dense or experts) and its norms."""

    input_norm: torch.Tensor
    qkv: Linear
    o: Linear
    post_norm: torch.Tensor  # the norm before the MLP
    gate_up: Linear | None  # dense MLP (None in a sparse layer)
    down: Linear | None
    moe: MoeBlock | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None  # sandwich norms (Gemma)
    post_mlp_norm: torch.Tensor | None = None
    window: int = 0
    rope: int = 0  # which rotary table: 0 global, 1 local (Gemma 3's sliding layers)


class DecoderModel:
    """A decoder-only causal LM over a paged KV cache."""

    def __init__(
        self,
        config: ModelConfig,
        dense: dict[str, torch.Tensor],
        device: torch.device,
        prefer: str = "auto",
        experts: ExpertSource | None = None,
    ) -> None:
        self.config = config
        self.device = device
        self.dtype = dense["embed"].dtype
        self.embed_tokens = dense["embed"]
        self.final_norm = dense["final_norm"]
        self.cos_sin = cos_sin_cache(config.rope, config.head_dim, config.max_model_len).to(device)
        self.cos_sin_local = (
            None
            if config.rope_local is None
            else cos_sin_cache(config.rope_local, config.head_dim, config.max_model_len).to(device)
        )
        self.scale = config.softmax_scale
        self.experts = experts  # where sparse layers find their experts (None: dense model)
        self._dense = dense  # kept only until _prepare() lays the weights out
        self._prepare(select_ops(device, self.dtype, prefer, config.head_dim))

    def _prepare(self, ops: TorchOps) -> None:
        d, cfg = self._dense, self.config
        self.ops = ops
        quant = cfg.quantization

        def linear(name: str) -> Linear:
            return ops.prepare_linear(d[name], d.get(f"{name}_bias"), quant)

        def gate_up(name: str) -> Linear:
            if cfg.hidden_act == "gelu_tanh":  # the fused kernel epilogue is SiLU only
                return linear(name)
            return ops.prepare_gate_up(d[name], d.get(f"{name}_bias"), quant)

        if self.experts is not None:
            self.experts.set_ops(ops, quant)
        self.layers = []
        for i in range(cfg.num_layers):
            sparse = cfg.moe is not None and cfg.moe.sparse_layers[i]
            self.layers.append(
                DecoderLayer(
                    input_norm=d[f"{i}.input_norm"],
                    qkv=linear(f"{i}.qkv"),
                    o=linear(f"{i}.o"),
                    post_norm=d[f"{i}.post_norm"],
                    gate_up=None if sparse else gate_up(f"{i}.gate_up"),
                    down=None if sparse else linear(f"{i}.down"),
                    moe=MoeBlock(cfg, i, d[f"{i}.router"], self.experts) if sparse else None,
                    q_norm=d.get(f"{i}.q_norm"),
                    k_norm=d.get(f"{i}.k_norm"),
                    post_attn_norm=d.get(f"{i}.post_attn_norm"),
                    post_mlp_norm=d.get(f"{i}.post_mlp_norm"),
                    window=cfg.window(i),
                    rope=1 if cfg.rope_local is not None and cfg.window(i) else 0,
                )
            )
        for layer, nxt in zip(self.layers, self.layers[1:], strict=False):
            if layer.moe is not None:
                layer.moe.next_router = nxt.moe.router if nxt.moe is not None else None
        # a tied, quantized head is rounded from the full-precision embedding ("lm_head_fp32")
        head = d.get("lm_head", d.get("lm_head_fp32", self.embed_tokens))
        self.lm_head = ops.prepare_linear(head, None, quant)
        self._dense = {}

    def set_backend(self, prefer: str) -> None:
        """Switch primitive ops: one of ``backend.BACKENDS`` ("torch" is the reference)."""
        self._dense = self.dense_weights()
        self._prepare(select_ops(self.device, self.dtype, prefer, self.config.head_dim))

    def dense_weights(self) -> dict[str, torch.Tensor]:
        """Every resident weight in plain ``[out, in]`` form, keyed ``"{layer}.{name}"`` (and
        "embed"...). Experts are not included: ``self.experts`` holds them."""
        out = {"embed": self.embed_tokens, "final_norm": self.final_norm}
        if not self.config.tie_word_embeddings:
            out["lm_head"] = self.lm_head.dense_weight()
        elif self.config.quantization:
            out["lm_head_fp32"] = self.lm_head.dense_weight()  # re-quantizes to the same values
        for i, layer in enumerate(self.layers):
            for name in ("input_norm", "post_norm", "q_norm", "k_norm", "post_attn_norm", "post_mlp_norm"):
                t = getattr(layer, name)
                if t is not None:
                    out[f"{i}.{name}"] = t
            if layer.moe is not None:
                out[f"{i}.router"] = layer.moe.router
            for name in ("qkv", "o", "gate_up", "down"):
                lin: Linear | None = getattr(layer, name)
                if lin is None:
                    continue
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
        experts: ExpertSource | None = None,
    ) -> DecoderModel:
        """Build from Hugging Face parameter names, as the config's family names them.

        ``state`` holds the checkpoint's tensors (experts excepted when ``experts``
        serves them); each is moved or fused once, then dropped from ``state``.
        """
        from tokenmill.model.registry import family

        names_of: Callable[[ModelConfig, int], dict[str, tuple[str, ...]]] = family(
            config.architecture
        ).layer_tensors

        def take(name: str) -> torch.Tensor:
            if name not in state:
                raise KeyError(f"checkpoint is missing tensor {name!r}")
            return state.pop(name)

        dense: dict[str, torch.Tensor] = {}
        for i in range(config.num_layers):
            for key, names in names_of(config, i).items():
                if key.endswith("_bias") and names[0] not in state:
                    continue  # biases are optional
                parts = [take(n) for n in names]
                dense[f"{i}.{key}"] = parts[0] if len(parts) == 1 else torch.cat(parts)
        dense["embed"] = take("model.embed_tokens.weight")
        dense["final_norm"] = take("model.norm.weight")
        if not config.tie_word_embeddings:
            if "lm_head.weight" not in state:
                raise KeyError(
                    "checkpoint has no 'lm_head.weight' and tie_word_embeddings is false"
                )
            dense["lm_head"] = take("lm_head.weight")
        if config.norm_weight_offset:
            # Gemma's RMSNorm scales by (1 + w): fold the offset in once, in fp32
            norms = ("input_norm", "post_norm", "q_norm", "k_norm", "post_attn_norm", "post_mlp_norm")
            for k, v in dense.items():
                if k == "final_norm" or k.rsplit(".", 1)[-1] in norms:
                    dense[k] = (v.float() + config.norm_weight_offset).to(v.dtype)
        if config.quantization:
            # linear weights stay in the checkpoint's precision until quantized; the rest
            # (norms, biases, embedding, routers) run in the activations' dtype
            if config.tie_word_embeddings:
                dense["lm_head_fp32"] = dense["embed"]
            dense = {
                k: v if k.rsplit(".", 1)[-1] in LINEAR_KEYS else v.to(config.dtype)
                for k, v in dense.items()
            }
        dense = {k: v.to(device).contiguous() for k, v in dense.items()}
        return cls(config, dense, device, prefer, experts)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        lora: LoraBatch | None = None,
    ) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` after the final norm, for ``input_ids [T]``
        (``lora``: which rows run which LoRA adapter; None: the base model only)."""
        cfg, ops = self.config, self.ops
        eps = cfg.rms_norm_eps
        t = input_ids.shape[0]
        q_size = cfg.q_size
        slots, scale = meta.slot_mapping, self.scale
        tables = (self.cos_sin, self.cos_sin_local)
        rope_pos = rope_positions(
            cfg.rope, positions, meta.query_start_loc, meta.seq_lens, cfg.max_model_len
        )
        residual = self.embed_tokens.index_select(0, input_ids)
        if cfg.embed_scale is not None:
            residual = residual * torch.tensor(cfg.embed_scale, dtype=residual.dtype)
        h: torch.Tensor | None = None
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            if h is None:
                x = ops.rms_norm(residual, layer.input_norm, eps)
            else:
                x = ops.add_rms_norm(h, residual, layer.input_norm, eps)
            qkv = ops.linear(x, layer.qkv)
            if lora is not None and lora.touches(i, "qkv"):
                ops.lora_apply(qkv, x, lora, i, "qkv")
            if layer.q_norm is not None:
                ops.qk_norm(qkv, layer.q_norm, layer.k_norm, cfg.num_heads, cfg.num_kv_heads, eps)
            ops.rope_write_kv(
                qkv, rope_pos, tables[layer.rope], kv_cache, slots, cfg.num_heads, cfg.num_kv_heads,
                meta.kv_format,
            )
            q = qkv[:, :q_size].view(t, cfg.num_heads, cfg.head_dim)
            att = ops.attention(q, kv_cache, meta, scale, layer.window, cfg.attn_softcap)
            att_out = att.view(t, q_size)
            h = ops.linear(att_out, layer.o)
            if lora is not None and lora.touches(i, "o"):
                ops.lora_apply(h, att_out, lora, i, "o")
            if layer.post_attn_norm is not None:
                h = ops.rms_norm(h, layer.post_attn_norm, eps)
            x = ops.add_rms_norm(h, residual, layer.post_norm, eps)
            if layer.moe is not None:
                h = layer.moe(x, ops)
            elif lora is not None:
                h = self._lora_mlp(i, layer, x, lora)
            elif cfg.hidden_act == "gelu_tanh":
                h = ops.linear(ops.gate_up_gelu(x, layer.gate_up), layer.down)
            else:
                h = ops.linear(ops.gate_up_silu(x, layer.gate_up), layer.down)
            if layer.post_mlp_norm is not None:
                h = ops.rms_norm(h, layer.post_mlp_norm, eps)
        assert h is not None
        return ops.add_rms_norm(h, residual, self.final_norm, eps)

    __call__ = forward

    def _lora_mlp(self, i: int, layer: DecoderLayer, x: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        """The gated MLP of layer ``i`` with the batch's adapters on gate/up and down."""
        ops, gelu = self.ops, self.config.hidden_act == "gelu_tanh"
        assert layer.gate_up is not None and layer.down is not None
        if lora.touches(i, "gate_up"):
            y = ops.linear(x, layer.gate_up)  # [T, 2I] in the weight's own feature order
            inter = y.shape[1] // 2 if layer.gate_up.silu_gate else 0
            ops.lora_apply(y, x, lora, i, "gate_up", inter)
            if inter:
                act = ops.silu_mul_panels(y)
            else:
                act = ops.gelu_mul(y) if gelu else ops.silu_mul(y)
        else:
            act = ops.gate_up_gelu(x, layer.gate_up) if gelu else ops.gate_up_silu(x, layer.gate_up)
        h = ops.linear(act, layer.down)
        if lora.touches(i, "down"):
            ops.lora_apply(h, act, lora, i, "down")
        return h

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[N, vocab]`` for the selected hidden rows ``[N, hidden]``."""
        logits = self.ops.linear(hidden.contiguous(), self.lm_head).float()
        cap = self.config.final_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
