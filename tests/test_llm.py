"""The offline API end to end: parity with transformers, scheduling invariance, sampling, bad input."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from tokenmill import LLM, SamplingParams


def prompts_for_test(n: int = 8, vocab: int = 320, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(rng.randint(3, 40))] for _ in range(n)]


def hf_greedy(model_dir, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # Generate exactly max_new tokens with EOS as an ordinary token (ignore_eos on our side);
    # min_new_tokens would instead forbid EOS and change the greedy choice.
    model.generation_config.eos_token_id = None
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(
            ids, do_sample=False, max_new_tokens=max_new, pad_token_id=0,
            attention_mask=torch.ones_like(ids),
        )  # fmt: skip
        out.append(gen[0, len(p) :].tolist())
    return out


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_greedy_matches_transformers(tiny_model_dir, arch: str) -> None:
    path = tiny_model_dir(arch)
    prompts = prompts_for_test()
    expected = hf_greedy(path, prompts, GREEDY.max_tokens)
    llm = LLM(str(path), dtype="float32", kv_cache_memory=8 << 20)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert got == expected


def test_same_outputs_with_tiny_chunks_preemption_and_seq_caps(tiny_model_dir) -> None:
    path = str(tiny_model_dir("llama"))
    prompts = prompts_for_test(seed=1)
    base = [o.outputs[0].token_ids for o in LLM(path, dtype="float32", kv_cache_memory=8 << 20).generate(prompts, GREEDY)]

    chunked = LLM(path, dtype="float32", kv_cache_memory=8 << 20, max_num_batched_tokens=8)
    assert [o.outputs[0].token_ids for o in chunked.generate(prompts, GREEDY)] == base

    # A KV budget so small that the batch cannot all fit: preemption must happen.
    kv_per_block = chunked.engine.executor.kv_bytes_per_block
    tight = LLM(path, dtype="float32", kv_cache_memory=kv_per_block * 8, block_size=16)
    assert [o.outputs[0].token_ids for o in tight.generate(prompts, GREEDY)] == base
    assert tight.engine.scheduler.num_preemptions > 0

    for seqs in (1, 8):
        llm = LLM(path, dtype="float32", kv_cache_memory=8 << 20, max_num_seqs=seqs)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == base


def test_seeded_sampling_is_reproducible_across_runs_and_batches(tiny_model_dir) -> None:
    path = str(tiny_model_dir("llama"))
    llm = LLM(path, dtype="float32", kv_cache_memory=8 << 20)
    prompt = prompts_for_test(1, seed=3)[0]
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([prompt], sp)[0].outputs[0].token_ids
    again = llm.generate([prompt], sp)[0].outputs[0].token_ids
    others = prompts_for_test(6, seed=9)
    mixed = llm.generate(
        others[:3] + [prompt] + others[3:],
        [SamplingParams(temperature=0.8, max_tokens=10, seed=i) for i in range(3)] + [sp]
        + [SamplingParams(temperature=1.2, max_tokens=20) for _ in range(3)],
    )[3].outputs[0].token_ids  # fmt: skip
    assert alone == again == mixed
    unseeded = {tuple(llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True))[0].outputs[0].token_ids) for _ in range(3)}
    assert len(unseeded) > 1  # sampling really samples


def test_n_samples_stop_strings_and_text(tiny_model_dir) -> None:
    path = str(tiny_model_dir("llama"))
    llm = LLM(path, dtype="float32", kv_cache_memory=8 << 20)
    out = llm.generate("the scheduler", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=20, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    tok = llm.get_tokenizer()
    for o in out.outputs:
        assert o.text == tok.decode(o.token_ids, skip_special_tokens=True)
        assert o.finish_reason == "length"
    # A stop string taken from the greedy text ends the completion just before it.
    full = llm.generate("the scheduler", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = llm.generate("the scheduler", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full[: full.index(stop)]


def test_logprobs_of_generated_tokens(tiny_model_dir) -> None:
    path = str(tiny_model_dir("llama"))
    llm = LLM(path, dtype="float32", kv_cache_memory=8 << 20)
    o = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True))[0].outputs[0]
    assert o.logprobs is not None and len(o.logprobs) == 5
    for tok, lp in zip(o.token_ids, o.logprobs, strict=True):
        assert tok in lp and lp[tok].rank == 1  # greedy picks the top token
        assert len(lp) == 3
        assert all(v.logprob <= 0 for v in lp.values())
    assert o.cumulative_logprob == pytest.approx(sum(lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs, strict=True)))


def test_bad_input_is_refused_and_the_engine_keeps_serving(tiny_model_dir) -> None:
    path = str(tiny_model_dir("llama"))
    llm = LLM(path, dtype="float32", kv_cache_memory=8 << 20, max_model_len=64)
    engine = llm.engine
    engine.add_request("good", [5, 6, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    cases = [
        ("", SamplingParams(), "empty"),
        ([], SamplingParams(), "empty"),
        ([5] * 64, SamplingParams(), "context length"),
        ([5, 999999], SamplingParams(), "vocabulary"),
    ]
    for prompt, params, msg in cases:
        with pytest.raises(ValueError, match=msg):
            engine.add_request("bad", prompt, params)
    for bad in [dict(max_tokens=0), dict(temperature=-0.5), dict(top_p=0.0), dict(top_p=1.01)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in outs] == ["good"] and len(outs[0].outputs[0].token_ids) == 6
    assert engine.scheduler.kv.pool.num_used == 0


def test_missing_model_and_unsupported_architecture(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        LLM(str(tmp_path / "nope"))
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        LLM(str(tmp_path / "gpt"))


def test_multibyte_text_is_detokenized_whole(tiny_model_dir) -> None:
    from tokenmill.detokenizer import IncrementalDetokenizer

    tok = LLM(str(tiny_model_dir("llama")), kv_cache_memory=4 << 20).get_tokenizer()
    text = "naïve café 東京 😀 straße"
    ids = tok(text)["input_ids"]
    detok = IncrementalDetokenizer(tok, [])
    pieces = [detok.add([t]) for t in ids]
    assert "".join(pieces) + detok.flush() == text
    assert all("\ufffd" not in p for p in pieces)


def test_seeds_that_used_to_collide_give_different_text(tiny_model_dir) -> None:
    path = str(tiny_model_dir("llama"))
    llm = LLM(path, dtype="float32", kv_cache_memory=8 << 20)
    prompt = prompts_for_test(1, seed=5)[0]

    def tokens(seed: int, n: int = 1, index: int = 0) -> list[int]:
        sp = SamplingParams(n=n, temperature=2.0, seed=seed, max_tokens=24, ignore_eos=True)
        return llm.generate([prompt], sp)[0].outputs[index].token_ids

    assert tokens(0) != tokens(2**63 - 1)
    assert tokens(-1) != tokens(-(2**63))
    # the fan-out used to give sample i the seed + i: sample 1 of seed 7 was seed 8's only sample
    assert tokens(7, n=2, index=1) != tokens(8)
    top = 2**63 - 1  # and seed + 1 left the 64-bit range
    assert tokens(top, n=2, index=1) != tokens(top, n=2, index=0)
    assert tokens(top, n=2, index=0) == tokens(top)  # sample 0 of n is the n=1 stream


def _hf_log_softmax(path: str, ids: list[int]) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].log_softmax(-1)


def test_prompt_logprobs_match_transformers_with_chunks_and_a_warm_prefix_cache(tiny_model_dir) -> None:
    path = str(tiny_model_dir("llama"))
    rng = random.Random(12)
    prompt = [rng.randrange(5, 320) for _ in range(40)]
    ref = _hf_log_softmax(path, prompt)
    # 16-token chunks; the prompt's full blocks get cached by a first request
    llm = LLM(path, dtype="float32", kv_cache_memory=8 << 20, max_num_batched_tokens=16, block_size=8)
    warm = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0))[0]
    assert warm.prompt_logprobs is None
    out = llm.generate([prompt], SamplingParams(n=2, max_tokens=3, temperature=0, prompt_logprobs=3))[0]
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(prompt) and plp[0] is None
    for j in range(1, len(prompt)):
        entry = plp[j]
        assert entry is not None and prompt[j] in entry
        assert entry[prompt[j]].logprob == pytest.approx(ref[j - 1, prompt[j]].item(), abs=1e-4)
        top = sorted((lp.rank, tid) for tid, lp in entry.items() if lp.rank is not None)
        assert [tid for _, tid in top] == ref[j - 1].topk(3).indices.tolist()
        for tid, lp in entry.items():
            assert lp.logprob == pytest.approx(ref[j - 1, tid].item(), abs=1e-4)
    # the cached prompt positions were recomputed for their logprobs, not skipped
    assert out.num_cached_tokens == 0
    assert all(o.token_ids == warm.outputs[0].token_ids[:1] + o.token_ids[1:] for o in out.outputs)
    again = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0))[0]
    assert again.num_cached_tokens > 0 and again.prompt_logprobs is None
    assert again.outputs[0].token_ids == out.outputs[0].token_ids


def test_prompt_logprobs_survive_preemption(tiny_model_dir) -> None:
    path = str(tiny_model_dir("llama"))
    rng = random.Random(13)
    prompts = [[rng.randrange(5, 320) for _ in range(30)] for _ in range(6)]
    # a cache of 12 blocks of 8 tokens for six 30-token prompts growing to 70: preemptions happen
    llm = LLM(path, dtype="float32", kv_cache_memory=12 * 8 * 2 * 2 * 2 * 16 * 4, block_size=8,
              max_num_batched_tokens=16, max_decode_steps=1)  # fmt: skip
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, prompt_logprobs=0))
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs, strict=True):
        ref = _hf_log_softmax(path, prompt)
        plp = out.prompt_logprobs
        assert plp is not None and len(plp) == len(prompt)
        got = [plp[j][prompt[j]].logprob for j in range(1, len(prompt))]  # type: ignore[index]
        assert got == pytest.approx([ref[j - 1, prompt[j]].item() for j in range(1, len(prompt))], abs=1e-4)


def test_prompt_logprobs_range_is_checked() -> None:
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
