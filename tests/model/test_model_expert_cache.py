"""Expert offloading: outputs identical to full residency, the cache's bounds, its
HybriMoE-style replacement, prefetching and its counters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenmill.model import load_model
from tokenmill.model.backend import TorchOps
from tokenmill.model.config import ModelConfig, MoeConfig, RopeConfig
from tokenmill.model.expert_cache import OffloadedExperts
from tokenmill.model.testing import make_tiny_checkpoint, prefill_logits


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 8 experts of 2 layers: half the expert bytes cannot hold what a prefill touches
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("offload") / "mixtral", "mixtral", seed=3, num_local_experts=8
    )


def run(model, seed: int) -> torch.Tensor:
    ids = torch.randint(0, 500, (23,), generator=torch.Generator().manual_seed(seed))
    return prefill_logits(model, ids, [9, 1, 1, 1, 11])  # a prefill, decodes, a chunk


@pytest.mark.parametrize(("dtype", "backend"), [("float32", "auto"), ("float32", "torch"), ("int8", "auto")])
def test_half_the_expert_bytes_gives_identical_outputs(mixtral: Path, dtype: str, backend: str) -> None:
    resident, _ = load_model(mixtral, dtype=dtype)
    resident.set_backend(backend)
    want = [run(resident, s) for s in range(3)]
    probe, _ = load_model(mixtral, dtype=dtype, expert_cache_memory=0)
    probe.set_backend(backend)
    half = probe.experts.total_expert_bytes() // 2
    model, _ = load_model(mixtral, dtype=dtype, expert_cache_memory=half)
    model.set_backend(backend)
    cache = model.experts
    for s in range(3):
        assert torch.equal(run(model, s), want[s])
        assert cache.used_bytes <= cache.capacity  # over budget only while a layer computes
    st = cache.stats
    assert st.misses > 0 and st.hits > 0 and st.evictions > 0
    assert 0 < st.hit_rate < 1 and st.bytes_read >= st.misses * cache.source_bytes // len(cache.sources)
    assert len(cache.cached()) <= len(cache.sources) // 2


def test_prefetch_reads_ahead_and_changes_nothing(mixtral: Path) -> None:
    full, _ = load_model(mixtral, dtype="float32")
    big = 10**9  # everything fits: every expert is read once, by a miss or a prefetch
    model, _ = load_model(mixtral, dtype="float32", expert_cache_memory=big)
    assert model.experts.prefetches
    for s in range(2):
        assert torch.equal(run(model, s), run(full, s))
    st = model.experts.stats
    assert st.prefetches > 0 and st.prefetch_hits > 0
    assert st.misses + st.prefetches == len(model.experts.cached())  # nothing read twice


def tiny_source(capacity_experts: int, prefetch: bool = False) -> OffloadedExperts:
    moe = MoeConfig(4, 1, 16, norm_topk_prob=True, sparse_layers=(True,))
    cfg = ModelConfig(
        "MixtralForCausalLM", 1, 16, 16, 2, 2, 8, 32, 64, 1e-6, RopeConfig(), False, False,
        False, False, torch.float32, moe=moe,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    sources = {
        (0, e): (torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g),
                 torch.randn(16, 16, generator=g))
        for e in range(4)
    }  # fmt: skip
    probe = OffloadedExperts(cfg, sources, 0, torch.float32, prefetch=False)
    probe.set_ops(TorchOps(), None)
    src = OffloadedExperts(cfg, sources, capacity_experts * probe.expert_bytes, torch.float32, prefetch)
    src.set_ops(TorchOps(), None)
    return src


def use(src: OffloadedExperts, *experts: int) -> None:
    src.acquire(0, torch.tensor([[e] for e in experts]))
    src.release(0)


def test_replacement_keeps_the_experts_routing_scores_favour() -> None:
    src = tiny_source(capacity_experts=2)
    # routing leans on expert 0; expert 1 is used but scores low
    src.observe(0, torch.tensor([[0.9, 0.05, 0.03, 0.02]] * 4))
    use(src, 0)
    use(src, 1)
    use(src, 1)  # more recent than 0: LRU would now evict 0
    use(src, 2)
    assert src.cached() == {(0, 0), (0, 2)}
    assert (src.stats.hits, src.stats.misses, src.stats.evictions) == (1, 3, 1)
    # scores decay: once routing moves to expert 3, expert 0 becomes the victim
    for _ in range(6):
        src.observe(0, torch.tensor([[0.0, 0.05, 0.45, 0.5]]))
    use(src, 3)
    assert src.cached() == {(0, 2), (0, 3)}


def test_a_layer_needing_more_than_the_cache_still_runs() -> None:
    src = tiny_source(capacity_experts=1)
    experts, local = src.acquire(0, torch.tensor([[0], [3], [1]]))
    assert len(experts) == 3 and local.tolist() == [[0], [2], [1]]
    assert src.used_bytes == 3 * src.expert_bytes  # pinned overflow while the layer computes
    src.release(0)
    assert src.used_bytes <= src.capacity


def test_prefetch_does_not_displace_better_experts() -> None:
    src = tiny_source(capacity_experts=1, prefetch=True)
    src.observe(0, torch.tensor([[0.9, 0.1, 0.0, 0.0]]))
    use(src, 0)
    src.prefetch(0, torch.tensor([[0.0, 0.3, 0.3, 0.4]]))  # 0.4 < expert 0's score 0.45
    assert src.cached() == {(0, 0)} and src.stats.prefetches == 0
    src.prefetch(0, torch.tensor([[0.0, 0.0, 0.0, 1.0]]))  # worth more: replaces it
    src._drain()
    assert src.cached() == {(0, 3)} and src.stats.prefetches == 1


def test_dense_models_refuse_an_expert_cache(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "llama", "llama")
    with pytest.raises(ValueError, match="mixture-of-experts"):
        load_model(path, expert_cache_memory=1 << 20)


def test_prefetch_can_be_turned_off(mixtral: Path) -> None:
    model, _ = load_model(mixtral, dtype="float32", expert_cache_memory=10**9, expert_prefetch=False)
    run(model, 0)
    assert not model.experts.prefetches and model.experts.stats.prefetches == 0
