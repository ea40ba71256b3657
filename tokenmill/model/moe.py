"""The sparse mixture-of-experts MLP: a router, top-k selection, and the experts' compute.

``MoeBlock`` replaces a layer's gated MLP. Its router (``[E, hidden]``) scores
every expert per token; the softmax's top ``k`` pick the experts and weight
their outputs (renormalised to sum to one with ``norm_topk_prob``, as Mixtral
always does). One ``ops.moe_experts`` call then runs every routed token: the
CPU kernel groups tokens by expert and runs grouped GEMMs (no Python loop over
experts or tokens).

Where the experts' weights live is an ``ExpertSource``: all resident in RAM
(``ResidentExperts``), or memory-mapped in the checkpoint with a cache of hot
ones (``expert_cache.OffloadedExperts``), which also hears the routing scores
(its replacement policy) and a guess at the next layer's experts (prefetch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.model.backend import Expert, TorchOps
from tokenmill.model.config import ModelConfig


class ExpertSource:
    """Serves each sparse layer's experts, prepared for the active ops."""

    #: whether ``prefetch`` does anything (skips the next layer's router product if not)
    prefetches = False

    def set_ops(self, ops: TorchOps, quant: str | None) -> None:
        raise NotImplementedError

    def acquire(self, layer: int, ids: torch.Tensor) -> tuple[list[Expert], torch.Tensor]:
        """Experts for routing ``ids [T, k]`` and the ids renumbered into that list."""
        raise NotImplementedError

    def release(self, layer: int) -> None:
        """The layer's expert compute is done with what ``acquire`` returned."""

    def observe(self, layer: int, probs: torch.Tensor) -> None:
        """The routing probabilities ``[T, E]`` of one step of ``layer``."""

    def prefetch(self, layer: int, predicted: torch.Tensor) -> None:
        """Routing probabilities ``[T, E]`` guessed for ``layer`` before it runs."""


class ResidentExperts(ExpertSource):
    """Every expert prepared once and held in memory."""

    def __init__(
        self, weights: dict[tuple[int, int], tuple[torch.Tensor, ...]], dtype: torch.dtype
    ) -> None:
        # (layer, expert) -> (gate [I, H], up [I, H], down [H, I]) as the checkpoint stores them
        # (memory-mapped views), laid out by set_ops in ``dtype`` (quantized from it for int8)
        self._raw = weights
        self.dtype = dtype
        self.layers: dict[int, list[Expert]] = {}

    def set_ops(self, ops: TorchOps, quant: str | None) -> None:
        if not self._raw:  # a backend switch: lay out again from the current experts
            for layer, experts in self.layers.items():
                for e, ex in enumerate(experts):
                    gate_up = ex.gate_up.dense_weight()
                    half = gate_up.shape[0] // 2
                    self._raw[(layer, e)] = (gate_up[:half], gate_up[half:], ex.down.dense_weight())
        layers: dict[int, list[Expert]] = {}
        template: Expert | None = None
        for layer, e in sorted(self._raw):
            gate, up, down = self._raw.pop((layer, e))  # pop: each raw copy is freed once laid out
            if template is None:
                template = ops.prepare_expert(
                    torch.cat([gate, up]).to(self.dtype), down.to(self.dtype).contiguous(), quant
                )
                expert = template
            else:
                # straight into fresh tensors of the template's layout: no temporaries per expert
                expert = template.empty_like()
                ops.fill_expert(expert, gate, up, down, self.dtype, quant)
            layers.setdefault(layer, []).append(expert)
        self.layers = layers

    def acquire(self, layer: int, ids: torch.Tensor) -> tuple[list[Expert], torch.Tensor]:
        return self.layers[layer], ids


class MoeBlock:
    """One sparse layer: router weights, top-k routing, and the experts from ``source``."""

    def __init__(
        self, config: ModelConfig, layer: int, router: torch.Tensor, source: ExpertSource | None
    ) -> None:
        assert config.moe is not None and source is not None
        self.moe = config.moe
        self.layer = layer
        self.router = router
        self.source = source
        self.next_router: torch.Tensor | None = None  # the next sparse layer's, for prefetch
        # tokens routed to each expert since load (the experts' load; a metric)
        self.tokens_per_expert = torch.zeros(config.moe.num_experts, dtype=torch.long, device=router.device)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(probs [T, E] fp32, topk_weights [T, k] fp32, topk_ids [T, k])`` as transformers."""
        probs = torch.softmax(F.linear(x, self.router).float(), dim=-1)
        weights, ids = torch.topk(probs, self.moe.top_k, dim=-1)
        if self.moe.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.moe.round_weights:
            weights = weights.to(x.dtype).float()
        return probs, weights, ids

    def __call__(self, x: torch.Tensor, ops: TorchOps) -> torch.Tensor:
        probs, weights, ids = self.route(x)
        src = self.source
        src.observe(self.layer, probs)
        experts, local_ids = src.acquire(self.layer, ids)  # pinned: a prefetch cannot evict them
        try:
            if src.prefetches and self.next_router is not None:
                # the next layer's router applied to this layer's input guesses its experts
                # (hidden states change little between adjacent layers), so their reads start
                # while this layer computes
                guess = torch.softmax(F.linear(x, self.next_router).float(), dim=-1)
                src.prefetch(self.layer + 1, guess)
            out = ops.moe_experts(x, local_ids, weights, experts)
        finally:
            src.release(self.layer)
        self.tokens_per_expert += torch.bincount(ids.flatten(), minlength=self.moe.num_experts)
        return out
