"""Speculative decoding end to end: the same greedy tokens for every proposer, the target's
distribution when sampling, reproducible seeds, logprobs, stops, and clear errors."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tests.spec.test_verify import CHI2_999, chi_square
from tokenmill.core.request import SamplingParams
from tokenmill.engine import Engine, EngineConfig
from tokenmill.executor.model_executor import ModelExecutor
from tokenmill.llm import LLM

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def prompts(seed: int = 3, n: int = 8) -> list[list[int]]:
    """Token-id prompts with a shared prefix (prefix cache) and repeats (so lookup finds matches)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(5, 320) for _ in range(20)]
    out = []
    for _ in range(n):
        motif = [rng.randrange(5, 320) for _ in range(rng.randint(2, 5))]
        out.append(prefix + motif * rng.randint(2, 4) + [rng.randrange(5, 320) for _ in range(rng.randint(1, 9))])
    return out


def tokens(llm: LLM, ps: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(ps, params)]


def proposers(path: Path, other: Path) -> dict[str, str]:
    return {
        "ngram": "ngram",
        "self-int8": "self-int8",
        "draft-same": f"draft:{path}",  # the target drafting for itself: every draft accepted
        "draft-other": f"draft:{other}",  # an unrelated model: most drafts rejected
    }


@pytest.fixture(scope="module")
def baseline(tiny_model_dir):
    """Plain greedy tokens of ``prompts()`` per architecture, computed once."""
    cache: dict[str, list[list[int]]] = {}

    def get(arch: str) -> list[list[int]]:
        if arch not in cache:
            cache[arch] = tokens(LLM(str(tiny_model_dir(arch)), dtype="float32", kv_cache_memory=8 << 20), prompts())
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("proposer", ["ngram", "self-int8", "draft-same", "draft-other"])
def test_greedy_tokens_are_identical_with_and_without_speculation(
    tiny_model_dir, tmp_path_factory, baseline, arch, proposer
):
    from tests.conftest import make_tiny_model

    path = tiny_model_dir(arch)
    other = make_tiny_model(tmp_path_factory.mktemp("other"), arch, seed=1) if proposer == "draft-other" else path
    spec = proposers(path, other)[proposer]
    ps, base = prompts(), baseline(arch)
    # batch 1, adaptive draft length
    one = LLM(str(path), dtype="float32", kv_cache_memory=8 << 20, max_num_seqs=1, speculative=spec)
    assert tokens(one, ps[:2]) == base[:2]
    # batch 8 with chunked prefill, the prefix cache and forced preemption (a cache too
    # small for the batch, the draft's KV included), fixed draft length
    ex = one.engine.executor
    per_block = ex.kv_bytes_per_block + (ex.proposer.kv_bytes_per_block(16) if ex.proposer.writes_kv else 0)
    tight = LLM(str(path), dtype="float32", kv_cache_memory=per_block * 6, max_num_batched_tokens=16,
                speculative=spec, num_speculative_tokens=3, debug_checks=True)  # fmt: skip
    assert tokens(tight, ps) == base
    stats = tight.engine.stats()
    assert tight.engine.scheduler.num_preemptions > 0
    assert stats.scheduler.prefix_hit_tokens > 0
    assert stats.spec is not None and stats.spec.num_drafts > 0
    assert tight.engine.scheduler.kv.pool.num_used == 0
    if proposer == "draft-same":
        assert stats.spec.acceptance_rate == 1.0


BUNDLED_TEXT = ["And the LORD said unto Moses,", "In the beginning God created", "Blessed are the"]
BUNDLED_GREEDY = SamplingParams(temperature=0.0, max_tokens=32)


@pytest.fixture(scope="module")
def bundled_baseline() -> list[list[int]]:
    """Plain greedy tokens of the bundled model on ``BUNDLED_TEXT * 3``, computed once."""
    return [o.outputs[0].token_ids for o in LLM(kv_cache_memory=32 << 20).generate(BUNDLED_TEXT * 3, BUNDLED_GREEDY)]


@pytest.mark.parametrize("spec", ["ngram", "draft:default", "self-int8"])
def test_bundled_model_greedy_identity_with_every_proposer(bundled_baseline, spec) -> None:
    from tokenmill.models import DEFAULT_DRAFT_PATH

    text = BUNDLED_TEXT
    # batch 8 over the repeated prompts (prefix cache hits); batch 1 over two of them.
    # A fixed draft length: on a model this small a draft step costs about as much as a
    # target step, so the adaptive length would (rightly) stop drafting.
    for seqs, batch in ((8, text * 3), (1, text[:2])):
        llm = LLM(kv_cache_memory=32 << 20, speculative=spec, num_speculative_tokens=3, max_num_seqs=seqs)
        assert [o.outputs[0].token_ids for o in llm.generate(batch, BUNDLED_GREEDY)] == bundled_baseline[: len(batch)]
        assert llm.engine.stats().spec.num_accepted_tokens > 0
    assert (DEFAULT_DRAFT_PATH / "model.safetensors").stat().st_size <= 5 * 10**6


def test_seeded_sampling_is_reproducible_and_ngram_matches_plain_decoding(tiny_model_dir) -> None:
    path = str(tiny_model_dir("llama"))
    ps = prompts(seed=9, n=4)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True, n=2)
    plain = LLM(path, dtype="float32", kv_cache_memory=8 << 20)
    ref = [[c.token_ids for c in o.outputs] for o in plain.generate(ps, params)]
    for spec in ("ngram", f"draft:{path}"):
        runs = []
        for _ in range(2):
            llm = LLM(path, dtype="float32", kv_cache_memory=8 << 20, speculative=spec, num_speculative_tokens=3)
            runs.append([[c.token_ids for c in o.outputs] for o in llm.generate(ps, params)])
            assert llm.engine.stats().spec.num_drafts > 0
        assert runs[0] == runs[1]
        if spec == "ngram":  # deterministic drafts are verified with the plain sampler's own draws
            assert runs[0] == ref


def test_logprobs_and_stop_strings_of_accepted_tokens() -> None:
    params = SamplingParams(temperature=0.0, max_tokens=48, logprobs=2, stop=["Moses"], n=2)
    text = ["And the LORD said unto Moses, Go", "And God said,"]
    base = LLM(kv_cache_memory=32 << 20).generate(text, params)
    spec = LLM(kv_cache_memory=32 << 20, speculative="ngram", num_speculative_tokens=4).generate(text, params)
    for a, b in zip(base, spec, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert (x.text, x.token_ids, x.finish_reason) == (y.text, y.token_ids, y.finish_reason)
            assert len(y.logprobs) == len(y.token_ids)
            for la, lb in zip(x.logprobs, y.logprobs, strict=True):
                assert la.keys() == lb.keys()
                assert all(abs(la[t].logprob - lb[t].logprob) < 1e-4 for t in la)
    assert any(o.finish_reason == "stop" for r in spec for o in r.outputs)


def test_streamed_outputs_add_up_to_the_final_text() -> None:
    llm = LLM(kv_cache_memory=32 << 20, speculative="ngram")
    eng = llm.engine
    eng.add_request("r", "And the LORD said unto Moses,", SamplingParams(temperature=0.0, max_tokens=40))
    pieces, final = [], None
    while eng.has_unfinished():
        for out in eng.step():
            pieces.append(out.outputs[0].text)
            final = out
    assert final is not None and final.finished
    assert eng.stats().spec.num_accepted_tokens > 0
    # each step's output carries the whole text so far; it only grows
    assert all(b.startswith(a) for a, b in zip(pieces, pieces[1:], strict=False))
    assert pieces[-1] == final.outputs[0].text


def _small_vocab_model(path: Path, seed: int, vocab: int = 16) -> Path:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   eos_token_id=None, bos_token_id=0)  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("proposer", ["draft", "ngram"])
def test_sampled_tokens_follow_the_target_distribution(tmp_path, proposer) -> None:
    """Temperature 1, vocabulary 16: the frequencies of the 2nd and 3rd output tokens (both
    verified drafts) match the target's marginals, computed with transformers (chi-square)."""
    import transformers

    target = _small_vocab_model(tmp_path / "target", seed=0)
    draft = _small_vocab_model(tmp_path / "draft", seed=1)
    prompt = [1, 2, 3, 4, 5, 1, 2, 3]
    hf = transformers.LlamaForCausalLM.from_pretrained(target)
    with torch.no_grad():
        p0 = hf(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        seq1 = torch.tensor([prompt + [a] for a in range(16)])
        p1 = hf(seq1).logits[:, -1].softmax(-1)  # [t0, t1]
        seq2 = torch.tensor([prompt + [a, b] for a in range(16) for b in range(16)])
        p2 = hf(seq2).logits[:, -1].softmax(-1).view(16, 16, 16)  # [t0, t1, t2]
    joint01 = p0[:, None] * p1
    marg1 = joint01.sum(0)
    marg2 = (joint01[:, :, None] * p2).sum((0, 1))

    spec = f"draft:{draft}" if proposer == "draft" else "ngram"
    config = EngineConfig(model=str(target), dtype="float32", max_num_seqs=256, speculative=spec,
                          num_speculative_tokens=2, max_seqs_per_request=None)  # fmt: skip
    executor = ModelExecutor(str(target), dtype="float32", kv_cache_memory=16 << 20, speculative=spec)
    engine = Engine(config, executor=executor)
    n = 1500
    engine.add_request("r", prompt, SamplingParams(temperature=1.0, max_tokens=5, n=n, seed=99))
    outs = []
    while engine.has_unfinished():
        outs.extend(o for o in engine.step() if o.finished)
    samples = [c.token_ids for c in outs[0].outputs]
    assert len(samples) == n and all(len(s) == 5 for s in samples)
    # the first proposal (after the prompt) covers the 2nd and 3rd tokens of every sample
    assert engine.stats().spec.num_draft_tokens >= 2 * n
    for pos, marg in ((1, marg1), (2, marg2)):
        counts = [0] * 16
        for s in samples:
            counts[s[pos]] += 1
        stat, df = chi_square(counts, marg.tolist())
        assert stat < CHI2_999.get(df, 37.70 + 2 * (df - 15)), (pos, stat, df, counts)


def test_bad_speculative_settings_are_refused(tiny_model_dir, tmp_path) -> None:
    from tests.conftest import make_tiny_model

    path = str(tiny_model_dir("llama"))
    with pytest.raises(ValueError, match="unknown speculative method 'eagle'"):
        EngineConfig(speculative="eagle")
    with pytest.raises(ValueError, match=">= 1"):
        EngineConfig(speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="needs a speculative method"):
        EngineConfig(num_speculative_tokens=3)
    other = make_tiny_model(tmp_path / "v400", "llama", vocab_size=400)
    with pytest.raises(ValueError, match="vocabulary of 400 tokens but the target's has 320"):
        LLM(path, dtype="float32", kv_cache_memory=8 << 20, speculative=f"draft:{other}")


def test_int8_self_draft_of_a_mixture_of_experts_model_is_refused(tmp_path) -> None:
    from tokenmill.model.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "moe", "mixtral")
    with pytest.raises(ValueError, match="self-draft of a mixture-of-experts model"):
        ModelExecutor(str(path), dtype="float32", kv_cache_memory=4 << 20, speculative="self-int8")
