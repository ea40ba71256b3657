"""Expert offloading: experts stay memory-mapped in the checkpoint, hot ones cached in RAM.

On a CPU box this is how a mixture-of-experts model bigger than its memory
budget is still served: ``OffloadedExperts`` keeps each expert as a view of the
safetensors file (the OS reads it on use and may drop it again) and holds at
most ``capacity`` bytes of experts prepared for the kernels (cast, quantized,
packed), in fixed slots allocated once and rewritten in place (no allocator
churn; fp32/bf16 experts go from the mapping into their slot's packed panels in
one strided copy). A layer asks for the experts its tokens were routed to; a
miss reads and prepares the expert on the spot.

Replacement follows HybriMoE's score-based caching, "Minus Recent Score"
(Zhong et al., 2025, arXiv:2504.05897; its ``KScoreAwareCache``): each expert
keeps a priority ``S <- a * s + (1 - a) * S`` where ``s`` is its mean routing
probability this step if it is among the layer's top-``p`` experts, and
``S <- (1 - a) * S`` otherwise; the victim is the unpinned cached expert with
the lowest ``S`` (least recently used among equals). Routing scores, unlike
recency alone, keep experts that are often routed to with high weight, which
is what MoE activation patterns reward.

Prefetch uses the next layer's gate on this layer's input — the speculative
gating of Eliseev & Mazur (2023, "Fast Inference of Mixture-of-Experts Language
Models with Offloading") and Pre-gated MoE (Hwang et al., ISCA 2024), which
DAOP (Zhang et al., DATE 2025) also builds its predictions on — and starts
reading the predicted experts in a background thread while the current layer
computes: at most ``top_k`` experts per layer, the most probable ones. As in
HybriMoE's impact-driven prefetch, a prefetch never displaces an expert worth
more: it only evicts experts whose priority is below the predicted expert's
routing probability.

Outputs do not depend on the cache: a cached expert is the same prepared
tensor a resident one would be. ``stats`` counts hits, misses, prefetches,
evictions and bytes read from the mapped files (Prometheus-style counters).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from tokenmill.model.backend import Expert, TorchOps
from tokenmill.model.config import ModelConfig
from tokenmill.model.moe import ExpertSource

ALPHA = 0.5  # HybriMoE's default weight of the newest routing score


@dataclass
class ExpertCacheStats:
    """Counters since load; ``hit_rate`` is hits / lookups."""

    hits: int = 0  # lookups served from RAM (a prefetched expert included)
    misses: int = 0  # lookups that read the expert from the checkpoint while the layer waited
    prefetch_hits: int = 0  # hits on an expert that a prefetch brought in
    prefetches: int = 0  # experts read ahead of use
    evictions: int = 0
    bytes_read: int = 0  # bytes read from the memory-mapped checkpoint (misses and prefetches)

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate,
            "prefetches": self.prefetches, "prefetch_hits": self.prefetch_hits,
            "evictions": self.evictions, "bytes_read": self.bytes_read,
        }  # fmt: skip


@dataclass
class _Entry:
    slot: Expert  # the memory it is (being) written into
    expert: Expert | None = None  # ``slot`` once filled
    loading: Future | None = None  # an in-flight prefetch
    pins: int = 0  # layers computing with it right now
    prefetched: bool = False  # brought in by a prefetch and not used yet
    last_use: int = 0


@dataclass
class _Pinned:
    keys: list[tuple[int, int]] = field(default_factory=list)


class OffloadedExperts(ExpertSource):
    """Experts memory-mapped in the checkpoint, with ``capacity`` bytes of them cached in RAM.

    ``sources[(layer, expert)]`` are the expert's gate, up and down tensors as
    stored (mmap views). The cache may exceed ``capacity`` while one layer
    computes, by that layer's experts that did not fit (they are evicted first
    afterwards): a step always runs.
    """

    def __init__(
        self,
        config: ModelConfig,
        sources: dict[tuple[int, int], tuple[torch.Tensor, ...]],
        capacity: int,
        load_dtype: torch.dtype,
        prefetch: bool = True,
    ) -> None:
        if capacity < 0:
            raise ValueError(f"expert cache memory must be >= 0 bytes, got {capacity}")
        assert config.moe is not None
        self.moe = config.moe
        self.sources = sources
        self.capacity = capacity
        self.load_dtype = load_dtype
        self.prefetches = prefetch
        self.stats = ExpertCacheStats()
        self.used_bytes = 0
        self.expert_bytes = 0  # prepared size of one expert (all have the same shape)
        self.source_bytes = sum(t.numel() * t.element_size() for ts in sources.values() for t in ts)
        layers = max((layer for layer, _ in sources), default=-1) + 1
        self.scores = torch.zeros(layers, self.moe.num_experts)  # HybriMoE's priority S
        self._top_p = min(self.moe.num_experts, 2 * self.moe.top_k)
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._pinned: dict[int, _Pinned] = {}
        self._lock = threading.Lock()
        self._tick = 0
        self._ops: TorchOps | None = None
        self._quant: str | None = None
        self._template: Expert | None = None
        self._free_slots: list[Expert] = []
        self._num_slots = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="expert-prefetch") if prefetch else None

    # ------------------------------------------------------------------ setup

    def set_ops(self, ops: TorchOps, quant: str | None) -> None:
        """Prepare experts for ``ops`` from now on (drops what is cached)."""
        self._drain()
        gate, up, down = next(iter(self.sources.values()))
        zeros = torch.zeros(gate.shape[0] + up.shape[0], gate.shape[1], dtype=self.load_dtype)
        template = ops.prepare_expert(zeros, torch.zeros(down.shape, dtype=self.load_dtype), quant)
        with self._lock:
            self._entries.clear()
            self.used_bytes = 0
            self._ops, self._quant, self._template = ops, quant, template
            self._free_slots, self._num_slots = [], 0
            self.expert_bytes = template.nbytes

    def total_expert_bytes(self) -> int:
        """RAM that every expert, prepared, would take (what full residency holds)."""
        return self.expert_bytes * len(self.sources)

    def _drain(self) -> None:
        with self._lock:
            pending = [e.loading for e in self._entries.values() if e.loading is not None]
        for f in pending:
            f.result()

    # ------------------------------------------------------------ the layer API

    def acquire(self, layer: int, ids: torch.Tensor) -> tuple[list[Expert], torch.Tensor]:
        needed = torch.unique(ids)  # sorted
        experts: list[Expert] = []
        pinned = self._pinned.setdefault(layer, _Pinned())
        for e in needed.tolist():
            key = (layer, e)
            experts.append(self._get(key))
            pinned.keys.append(key)
        lut = torch.full((self.moe.num_experts,), -1, dtype=torch.long)
        lut[needed] = torch.arange(needed.numel())
        return experts, lut[ids]

    def release(self, layer: int) -> None:
        pinned = self._pinned.pop(layer, None)
        if pinned is None:
            return
        with self._lock:
            for key in pinned.keys:
                self._entries[key].pins -= 1
            self._evict(0)  # back under capacity once the layer's overflow is unpinned

    def observe(self, layer: int, probs: torch.Tensor) -> None:
        """HybriMoE MRS update of the layer's priorities from this step's routing."""
        mean = probs.mean(dim=0)
        top = torch.topk(mean, self._top_p).indices
        s = self.scores[layer]
        with self._lock:
            s.mul_(1 - ALPHA)
            s[top] += ALPHA * mean[top]

    def prefetch(self, layer: int, predicted: torch.Tensor) -> None:
        """Start reading the experts ``predicted [T, E]`` routes to in ``layer`` (top-k per token)."""
        if self._pool is None or self._ops is None:
            return
        mean = predicted.mean(dim=0)
        # the top_k most probable experts: a batch's union would read (and evict) far more
        for e in torch.topk(mean, self.moe.top_k).indices.tolist():
            key = (layer, e)
            with self._lock:
                if key in self._entries:
                    continue
                # only displace experts worth less than this guess (HybriMoE's impact rule)
                if not self._evict(self.expert_bytes, below=float(mean[e])):
                    return
                entry = _Entry(self._take_slot(), prefetched=True, last_use=self._next_tick())
                self._entries[key] = entry
                self.stats.prefetches += 1
                entry.loading = self._pool.submit(self._fill, key, entry)

    # --------------------------------------------------------------- internals

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    def _get(self, key: tuple[int, int]) -> Expert:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.pins += 1
                entry.last_use = self._next_tick()
                self.stats.hits += 1
                if entry.prefetched:
                    self.stats.prefetch_hits += 1
                    entry.prefetched = False
                loading = entry.loading
            else:
                self.stats.misses += 1
                self._evict(self.expert_bytes)  # may stay over capacity: the layer needs it
                entry = _Entry(self._take_slot(), pins=1, last_use=self._next_tick())
                self._entries[key] = entry
                loading = None
        if loading is not None:
            loading.result()  # a prefetch still reading: wait for it (it was a head start)
        elif entry.expert is None:
            self._fill(key, entry)
        assert entry.expert is not None
        return entry.expert

    def _fill(self, key: tuple[int, int], entry: _Entry) -> None:
        """Read an expert from the mapped file and prepare it (outside the lock)."""
        assert self._ops is not None
        gate, up, down = self.sources[key]
        # slots are inference tensors (made during a forward pass); the prefetch thread
        # does not inherit the caller's inference mode
        with torch.inference_mode():
            self._ops.fill_expert(entry.slot, gate, up, down, self.load_dtype, self._quant)
        nbytes = sum(t.numel() * t.element_size() for t in (gate, up, down))
        with self._lock:
            entry.expert = entry.slot
            entry.loading = None
            self.stats.bytes_read += nbytes

    def _evict(self, need: int, below: float | None = None) -> bool:
        """Free room for ``need`` more bytes (lock held); False if it cannot.

        Victims: unpinned, loaded experts, lowest priority first (then least recently
        used); with ``below`` only those whose priority is lower than it.
        """
        while self.used_bytes + need > self.capacity:
            victims = [
                (float(self.scores[k[0], k[1]]), e.last_use, k)
                for k, e in self._entries.items()
                if e.pins == 0 and e.loading is None and e.expert is not None
            ]
            if below is not None:
                victims = [v for v in victims if v[0] < below]
            if not victims:
                return False
            _, _, key = min(victims)
            self._release_slot(self._entries.pop(key).slot)
            self.stats.evictions += 1
        return True

    def _take_slot(self) -> Expert:
        """A slot for one more cached expert (lock held): a free one, else a new one."""
        self.used_bytes += self.expert_bytes
        if self._free_slots:
            return self._free_slots.pop()
        assert self._template is not None
        self._num_slots += 1
        with torch.inference_mode():
            return self._template.empty_like()

    def _release_slot(self, slot: Expert) -> None:
        """Back to the free list, or freed if it was one of a layer's overflow (lock held)."""
        self.used_bytes -= self.expert_bytes
        if self._num_slots * self.expert_bytes <= self.capacity:
            self._free_slots.append(slot)
        else:
            self._num_slots -= 1

    def cached(self) -> set[tuple[int, int]]:
        """The (layer, expert) pairs held in RAM now."""
        with self._lock:
            return {k for k, e in self._entries.items() if e.expert is not None}
