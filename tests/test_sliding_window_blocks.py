"""Mistral with a sliding window shorter than its sequences: the engine gives back KV blocks
the window has passed and still matches transformers' greedy tokens past the window."""

from __future__ import annotations

import pytest

from tests.conftest import make_tokenizer
from tests.test_llm import hf_greedy, prompts_for_test
from tokenmill import LLM
from tokenmill.core.kv_manager import NULL_BLOCK
from tokenmill.core.request import SamplingParams
from tokenmill.model.testing import make_tiny_checkpoint

VOCAB = 320
WINDOW = 6


@pytest.fixture(scope="module")
def mistral_window(tmp_path_factory: pytest.TempPathFactory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("mistral_w"), "mistral", seed=5, vocab_size=VOCAB,
                                eos_token_id=0, sliding_window=WINDOW)  # fmt: skip
    make_tokenizer(path, VOCAB)
    return path


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_window_blocks_are_freed_and_greedy_matches_transformers(mistral_window, kv_cache_dtype: str) -> None:
    prompts = [p + p for p in prompts_for_test(n=6, vocab=VOCAB, seed=4)]  # up to 80 tokens
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    llm = LLM(str(mistral_window), dtype="float32", kv_cache_memory=4 << 20, block_size=4,
              max_num_batched_tokens=16, kv_cache_dtype=kv_cache_dtype)  # fmt: skip
    engine = llm.engine
    assert engine.executor.kv_window == WINDOW and engine.scheduler.config.kv_window == WINDOW
    peak, nulls = 0, 0
    step = engine.step

    def watched():
        nonlocal peak, nulls
        out = step()
        peak = max(peak, engine.scheduler.kv.pool.num_used)
        nulls = max(nulls, sum(t.count(NULL_BLOCK) for t in engine.scheduler.kv.tables.values()))
        return out

    engine.step = watched  # type: ignore[method-assign]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    longest = max(len(p) for p in prompts) + params.max_tokens
    assert longest > 10 * WINDOW
    if kv_cache_dtype == "auto":  # (int8 KV rounds the keys: a random tiny model's greedy path drifts)
        assert got == hf_greedy(mistral_window, prompts, params.max_tokens)
    assert nulls > 0
    # six sequences of up to 104 tokens would hold 26 blocks each; the window keeps a few
    assert peak <= 6 * 8
    assert engine.scheduler.kv.pool.num_used == 0
    # the same prompts again: the prefix cache serves their first window, outputs unchanged
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == got
    assert engine.scheduler.kv.prefix_hit_tokens > 0
