"""KV eviction through the real model: prompt logprobs against transformers with the same KV kept.

The reference runs transformers with a 4-d attention mask in which the query
at position ``p`` sees exactly the positions the policy kept when ``p`` was
computed, re-deriving StreamingLLM's and H2O's choices (H2O from
transformers' own attention probabilities, summed over layers and heads).
Keys keep their original rotary positions in both, so matching logprobs
show the engine's compaction, entry bookkeeping and RoPE positions right.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import make_tokenizer
from tokenmill import LLM
from tokenmill.core.kv_eviction import KVEviction
from tokenmill.core.request import SamplingParams
from tokenmill.model.testing import load_hf_model, make_tiny_checkpoint

VOCAB = 320


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("evict"), "llama", seed=9, vocab_size=VOCAB, eos_token_id=0)
    make_tokenizer(path, VOCAB)
    return path


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, VOCAB) for _ in range(n)]


def reference_logprobs(path, ids: list[int], spec: KVEviction | None, chunk: int) -> list[float]:
    """Log-probabilities of ``ids[1:]`` under ``spec``, computed in chunks of ``chunk`` tokens."""
    hf = load_hf_model(path)
    n = len(ids)
    x = torch.tensor([ids])
    visible = torch.zeros(n, n, dtype=torch.bool)
    kept: list[int] = []
    mass: dict[int, float] = {}

    def forward(upto: int, attentions: bool = False):
        m = torch.where(visible[:upto, :upto], 0.0, torch.finfo(torch.float32).min)[None, None]
        with torch.no_grad():
            return hf(x[:, :upto], attention_mask=m, output_attentions=attentions)

    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        for p in range(a, b):
            visible[p, kept + list(range(a, p + 1))] = True
        kept += range(a, b)
        if spec is None:
            continue
        if spec.policy == "h2o":
            att = forward(b, attentions=True).attentions  # per layer [1, heads, q, k]
            for p in range(a, b):
                for k in kept:
                    mass[k] = mass.get(k, 0.0) + sum(float(layer[0, :, p, k].sum()) for layer in att)
        excess = len(kept) - spec.budget
        if excess > 0:
            newest = b - 1
            candidates = [p for p in kept if spec.sinks <= p <= newest - spec.window]
            key = (lambda p: p) if spec.policy == "streaming" else (lambda p: (mass[p], p))
            gone = set(sorted(candidates, key=key)[:excess])
            kept = [p for p in kept if p not in gone]
    logits = forward(n).logits[0].float()
    lp = logits.log_softmax(-1)
    return [float(lp[p, ids[p + 1]]) for p in range(n - 1)]


def engine_logprobs(path, ids: list[int], spec: KVEviction | None, chunk: int, **kw) -> list[float]:
    llm = LLM(str(path), dtype="float32", kv_cache_memory=4 << 20, block_size=4, max_num_batched_tokens=chunk,
              kv_eviction=spec, debug_checks=True, **kw)  # fmt: skip
    out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0))[0]
    assert llm.engine.scheduler.kv.pool.num_used == 0
    return [out.prompt_logprobs[p + 1][ids[p + 1]].logprob for p in range(len(ids) - 1)]


@pytest.mark.parametrize("policy", ["streaming", "h2o"])
@pytest.mark.parametrize("chunk", [1, 7])
def test_prompt_logprobs_under_eviction_match_transformers_with_the_same_kv_kept(tiny, policy: str, chunk: int) -> None:
    ids = tokens(48, 5)
    spec = KVEviction(policy, 14, sinks=2, recent=6)
    got = engine_logprobs(tiny, ids, spec, chunk)
    want = reference_logprobs(tiny, ids, spec, chunk)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=2e-4, rtol=1e-4)
    # and eviction changed them: the same prompt with all its KV differs past the budget
    full = reference_logprobs(tiny, ids, None, chunk)
    assert max(abs(a - b) for a, b in zip(got[20:], full[20:], strict=True)) > 1e-2


def test_a_budget_the_sequence_never_reaches_changes_nothing(tiny) -> None:
    ids = tokens(30, 6)
    full = engine_logprobs(tiny, ids, None, 8)
    for policy in ("streaming", "h2o"):
        torch.testing.assert_close(torch.tensor(engine_logprobs(tiny, ids, KVEviction(policy, 64), 8)),
                                   torch.tensor(full), atol=1e-5, rtol=1e-5)  # fmt: skip


def test_eviction_over_int8_kv_stays_close_to_full_precision_eviction(tiny) -> None:
    ids = tokens(40, 8)
    spec = KVEviction("h2o", 16, sinks=2, recent=6)
    plain = torch.tensor(engine_logprobs(tiny, ids, spec, 4))
    quant = torch.tensor(engine_logprobs(tiny, ids, spec, 4, kv_cache_dtype="int8"))
    assert (plain - quant).abs().mean() < 0.02


def test_generation_with_a_budget_holds_only_the_budget(tiny) -> None:
    spec = KVEviction("streaming", 12, sinks=2)
    llm = LLM(str(tiny), dtype="float32", kv_cache_memory=4 << 20, block_size=4, max_num_batched_tokens=16,
              kv_eviction=spec, debug_checks=True)  # fmt: skip
    engine = llm.engine
    peak = 0
    step = engine.step

    def watched():
        nonlocal peak
        out = step()
        peak = max(peak, engine.scheduler.kv.pool.num_used)
        for r in engine.scheduler.running:
            kept = engine.scheduler.kv.kept_positions(r)
            assert len(kept) == min(r.num_computed_tokens, 12)
            if r.num_computed_tokens > 12:
                assert kept[:2] == [0, 1] and kept[-1] == r.num_computed_tokens - 1
        return out

    engine.step = watched  # type: ignore[method-assign]
    prompts = [tokens(30, i) for i in range(3)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 40 for o in outs)
    assert peak <= 3 * 7  # 70 tokens each would need 18 blocks; a budget of 12 plus a chunk of 16 fits 7
    # a request may ask for no eviction (None) where the engine evicts by default
    llm.engine.add_request("plain", prompts[0], SamplingParams(max_tokens=4), kv_eviction=None)
    assert llm.engine.scheduler.requests["plain"].kv_eviction is None
