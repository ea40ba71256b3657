"""Prefix reuse end to end on a real checkpoint: greedy outputs do not depend on the cache or the policy.

The prompts share system prompts, so with the cache on most prompt tokens
come from KV computed for other requests (and, in a second round, from KV
of finished requests). Greedy outputs must be identical to a run with the
cache off, under every scheduling policy, and when the KV cache is so small
that blocks are evicted and requests preempted.
"""

from __future__ import annotations

import random

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.core.policies import available_policies

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def shared_prefix_prompts(seed: int = 0, vocab: int = 320) -> list[list[int]]:
    rng = random.Random(seed)
    systems = [[rng.randrange(5, vocab) for _ in range(rng.randint(33, 50))] for _ in range(3)]
    return [rng.choice(systems) + [rng.randrange(5, vocab) for _ in range(rng.randint(1, 9))] for _ in range(9)]


def greedy(llm: LLM, prompts: list[list[int]]) -> tuple[list[list[int]], int]:
    outs = llm.generate(prompts, GREEDY)
    return [o.outputs[0].token_ids for o in outs], sum(o.num_cached_tokens for o in outs)


@pytest.fixture(scope="module")
def baseline(tiny_model_dir) -> tuple[str, list[list[int]], list[list[int]]]:
    path = str(tiny_model_dir("llama"))
    prompts = shared_prefix_prompts()
    off, cached = greedy(LLM(path, dtype="float32", kv_cache_memory=8 << 20, enable_prefix_caching=False), prompts)
    assert cached == 0
    return path, prompts, off


@pytest.mark.parametrize("policy", available_policies())
def test_cache_on_matches_cache_off(baseline, policy: str) -> None:
    path, prompts, off = baseline
    llm = LLM(path, dtype="float32", kv_cache_memory=8 << 20, block_size=8, policy=policy)
    first, cached_first = greedy(llm, prompts)
    assert first == off
    # The second round finds every full prompt block in the cache.
    again, cached_again = greedy(llm, prompts)
    assert again == off
    assert cached_again > cached_first
    assert cached_again >= sum((len(p) - 1) // 8 * 8 for p in prompts)


def test_cache_on_matches_cache_off_under_eviction_and_preemption(baseline) -> None:
    path, prompts, off = baseline
    probe = LLM(path, dtype="float32", kv_cache_memory=8 << 20, block_size=8)
    per_block = probe.engine.executor.kv_bytes_per_block
    tight = LLM(path, dtype="float32", kv_cache_memory=per_block * 12, block_size=8, max_num_seqs=4)
    got, _ = greedy(tight, prompts)
    assert got == off
    st = tight.engine.stats().scheduler
    assert st.num_evicted_blocks > 0
