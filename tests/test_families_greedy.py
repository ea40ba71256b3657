"""Greedy generation of every supported family against transformers, end to end.

Batch of 8 token-id prompts of different lengths through ``LLM`` (fp32, tiny
random checkpoints): the engine's paged KV, chunked prefill and multi-step
decodes must reproduce transformers' greedy tokens exactly — including Gemma
sequences longer than their sliding window and a Mixtral batch whose tokens
reach every expert.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_tokenizer
from tests.test_llm import GREEDY, hf_greedy, prompts_for_test
from tokenmill import LLM
from tokenmill.model.testing import make_tiny_checkpoint

VOCAB = 320
CASES = {
    "qwen3": ("qwen3", {}),
    "gemma2": ("gemma2", {"sliding_window": 6}),
    "gemma3": ("gemma3", {"sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("phi3", {}),
    "mistral_window": ("mistral", {"sliding_window": 6}),
    "mixtral": ("mixtral", {}),
    "qwen3_moe": ("qwen3_moe", {}),
}  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in cache:
            arch, kw = CASES[case]
            path = make_tiny_checkpoint(
                tmp_path_factory.mktemp(case), arch, seed=11, vocab_size=VOCAB, eos_token_id=0, **kw
            )
            make_tokenizer(path, VOCAB)
            cache[case] = path
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_batch_matches_transformers(models, case: str) -> None:
    path = models(case)
    prompts = prompts_for_test(vocab=VOCAB, seed=2)
    expected = hf_greedy(path, prompts, GREEDY.max_tokens)
    llm = LLM(str(path), dtype="float32", kv_cache_memory=8 << 20)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert got == expected
    model = llm.engine.executor.model
    window = model.config.window(0)
    if window:  # the batch has sequences longer than the window
        assert max(len(p) for p in prompts) + GREEDY.max_tokens > 2 * window
    if case == "mixtral":
        for layer in model.layers:
            assert bool((layer.moe.tokens_per_expert > 0).all()), layer.moe.tokens_per_expert


def test_offloaded_experts_generate_the_same_tokens(models) -> None:
    path = models("mixtral")
    prompts = prompts_for_test(vocab=VOCAB, seed=3)
    full = LLM(str(path), dtype="float32", kv_cache_memory=8 << 20)
    want = [o.outputs[0].token_ids for o in full.generate(prompts, GREEDY)]
    half = full.engine.executor.model.experts
    total = sum(e.nbytes for layer in half.layers.values() for e in layer) // 2
    llm = LLM(str(path), dtype="float32", kv_cache_memory=8 << 20, expert_cache_memory=total)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == want
    stats = llm.engine.stats().expert_cache
    assert stats.misses > 0 and stats.evictions > 0 and stats.bytes_read > 0
    assert full.engine.stats().expert_cache is None
    # and the server exports them
    from tokenmill.server.metrics import ServerMetrics

    metrics = ServerMetrics("m")
    metrics.on_stats(llm.engine.stats(), in_flight=0)
    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        (s.name, s.labels.get("result")): s.value
        for fam in text_string_to_metric_families(metrics.render().decode())
        for s in fam.samples
    }
    assert samples[("tokenmill_expert_cache_lookups_total", "miss")] == stats.misses
    assert samples[("tokenmill_expert_cache_lookups_total", "hit")] == stats.hits
    assert samples[("tokenmill_expert_cache_read_bytes_total", None)] == stats.bytes_read
