"""Adapters through the engine and the offline API: namespaces, LRU residency, registration,
and what happens when an adapter can no longer be loaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tokenmill.core.lora import LoRARequest
from tokenmill.core.request import SamplingParams
from tokenmill.engine import Engine, EngineConfig
from tokenmill.lora.errors import LoraError, LoraNotFoundError

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPT = [(7 * i + 3) % 300 + 5 for i in range(40)]  # two full blocks of 16 and a tail


def engine(base: Path, **kw) -> Engine:
    return Engine(EngineConfig(model=str(base), dtype="float32", kv_cache_memory=8 << 20, **kw))


def run(eng: Engine) -> dict:
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    assert eng.scheduler.kv.pool.num_used == 0
    return done


def test_same_prompt_under_two_adapters(lora_base, peft_adapters) -> None:
    eng = engine(lora_base)
    eng.add_lora("attn", str(peft_adapters["attn"]))
    eng.add_lora("mlp", str(peft_adapters["mlp"]))
    outs = {}
    for rid, lora in (("attn", "attn"), ("mlp", "mlp"), ("attn-again", "attn"), ("base", None)):
        eng.add_request(rid, PROMPT, GREEDY, lora=lora)
        outs[rid] = run(eng)[rid]
    assert outs["attn"].outputs[0].token_ids != outs["mlp"].outputs[0].token_ids
    assert outs["attn"].num_cached_tokens == 0
    assert outs["mlp"].num_cached_tokens == 0  # the attn adapter's KV of the same prompt is not shared
    assert outs["base"].num_cached_tokens == 0
    assert outs["attn-again"].num_cached_tokens == 32  # its own namespace does serve it
    assert outs["attn-again"].outputs[0].token_ids == outs["attn"].outputs[0].token_ids


def test_lru_residency_gives_the_same_outputs(lora_base, peft_adapters) -> None:
    """With room for one adapter at a time, requests of three adapters take turns; adapters are
    unloaded (LRU) and read again, and every output is what a roomy engine gives."""
    outputs = {}
    for max_loras in (3, 1):
        eng = engine(lora_base, max_loras=max_loras)
        for name, path in peft_adapters.items():
            eng.add_lora(name, str(path))
        for i in range(2):
            for name in peft_adapters:
                eng.add_request(f"{name}{i}", PROMPT[: 9 + i], GREEDY, lora=name)
        eng.add_request("base", PROMPT[:9], GREEDY)
        got = run(eng)
        outputs[max_loras] = {rid: o.outputs[0].token_ids for rid, o in got.items()}
        manager = eng.executor.loras
        assert len(manager.resident) <= max_loras
        if max_loras == 1:
            assert manager.num_evictions >= 3 and manager.num_loads >= 5
    assert outputs[1] == outputs[3]


def test_registration_errors_leave_nothing_behind(lora_base, peft_adapters) -> None:
    eng = engine(lora_base, max_lora_rank=8)
    with pytest.raises(LoraError, match="rank 16, over the maximum LoRA rank 8"):
        eng.add_lora("full", str(peft_adapters["full"]))
    assert "full" not in eng.loras
    eng.add_lora("attn", str(peft_adapters["attn"]))
    with pytest.raises(LoraError, match="'attn' is already loaded"):
        eng.add_lora("attn", str(peft_adapters["mlp"]))
    with pytest.raises(LoraNotFoundError, match="'nope' is not loaded"):
        eng.add_request("r", PROMPT, GREEDY, lora="nope")
    assert not eng.has_unfinished()
    # a request may outlive its adapter's registration; new ones cannot name it
    eng.add_request("running", PROMPT, GREEDY, lora="attn")
    eng.step()
    eng.remove_lora("attn")
    with pytest.raises(LoraNotFoundError):
        eng.add_request("late", PROMPT, GREEDY, lora="attn")
    with pytest.raises(LoraNotFoundError):
        eng.remove_lora("attn")
    assert run(eng)["running"].outputs[0].finish_reason == "length"


def test_an_adapter_that_cannot_be_loaded_again_aborts_only_its_requests(lora_base, peft_adapters, tmp_path) -> None:
    eng = engine(lora_base, max_loras=1)
    doomed = shutil.copytree(peft_adapters["mlp"], tmp_path / "doomed")
    eng.add_lora("doomed", str(doomed))
    eng.add_lora("attn", str(peft_adapters["attn"]))  # max_loras=1: "doomed" is unloaded
    shutil.rmtree(doomed)
    eng.add_request("d", PROMPT, GREEDY, lora="doomed")
    eng.add_request("base", PROMPT, GREEDY)
    done = run(eng)
    assert done["d"].outputs[0].finish_reason == "abort"
    assert done["base"].outputs[0].finish_reason == "length" and len(done["base"].outputs[0].token_ids) == 6
    assert "doomed" not in eng.loras  # unregistered: new requests get "not loaded"
    with pytest.raises(LoraNotFoundError):
        eng.add_request("d2", PROMPT, GREEDY, lora="doomed")


def test_offline_generate_with_lora(lora_base, peft_adapters) -> None:
    from tokenmill import LLM

    llm = LLM(str(lora_base), kv_cache_memory=8 << 20, lora_modules={"attn": str(peft_adapters["attn"])})
    prompt = {"prompt_token_ids": PROMPT[:12]}
    by_name = llm.generate(prompt, GREEDY, lora="attn")[0].outputs[0].token_ids
    base = llm.generate(prompt, GREEDY)[0].outputs[0].token_ids
    by_request = llm.generate(prompt, GREEDY, lora_request=LoRARequest("attn", 99, str(peft_adapters["attn"])))
    by_path = llm.generate(prompt, GREEDY, lora=str(peft_adapters["mlp"]))[0].outputs[0].token_ids
    mixed = llm.generate([prompt] * 3, GREEDY, lora=["attn", None, str(peft_adapters["mlp"])])
    assert by_name != base and by_path not in (base, by_name)
    assert by_request[0].outputs[0].token_ids == by_name
    assert [o.outputs[0].token_ids for o in mixed] == [by_name, base, by_path]
    with pytest.raises(ValueError, match="2 LoRA adapters for 3 prompts"):
        llm.generate([prompt] * 3, GREEDY, lora=["attn", None])
    with pytest.raises(LoraError, match="is loaded from"):
        llm.generate(prompt, GREEDY, lora=LoRARequest("attn", 1, str(peft_adapters["mlp"])))
