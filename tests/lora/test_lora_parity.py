"""Greedy parity with transformers + peft (each adapter merged into the base), fp32.

One engine batch mixes base requests with three adapters of different ranks
and target sets (``conftest.ADAPTERS``); a small token budget makes prefill
chunks of some requests share steps with decodes of others, and decode runs
multi-step. Both the compiled kernel and the torch reference are checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.lora.conftest import merged_model
from tokenmill.core.request import SamplingParams
from tokenmill.engine import Engine, EngineConfig
from tokenmill.model import kernels

PROMPTS = [[5, 17, 33, 91, 120, 7, 8, 250, 19], [200, 3, 44, 45, 46], [9, 9, 9, 300, 301, 302, 303, 310, 11, 12, 13]]
NEW_TOKENS = 10


def reference(base: Path, adapter: Path | None) -> list[list[int]]:
    model = merged_model(base, adapter)
    out = []
    for prompt in PROMPTS:
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
        out.append(ids[0, len(prompt) :].tolist())
    return out


@pytest.fixture(scope="module")
def expected(lora_base: Path, peft_adapters: dict[str, Path]) -> dict[str | None, list[list[int]]]:
    want = {name: reference(lora_base, path) for name, path in peft_adapters.items()}
    want[None] = reference(lora_base, None)
    return want


@pytest.mark.parametrize("backend", ["cpu_kernels", "torch"])
def test_mixed_batch_matches_merged_peft(backend, lora_base, peft_adapters, expected) -> None:
    if backend == "cpu_kernels" and not kernels.cpu_kernels_available():
        pytest.skip("the CPU kernels could not be built")
    engine = Engine(EngineConfig(model=str(lora_base), dtype="float32", max_num_batched_tokens=24,
                                 max_loras=3, max_lora_rank=16, kv_cache_memory=8 << 20))  # fmt: skip
    engine.executor.model.set_backend(backend)
    for name, path in peft_adapters.items():
        engine.add_lora(name, str(path))
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    names: list[str | None] = [None, *peft_adapters]
    for i in range(len(PROMPTS)):
        for name in names:
            engine.add_request(f"{i}/{name}", PROMPTS[i], params, lora=name)
    got: dict[str, list[int]] = {}
    lora_steps = 0
    while engine.has_unfinished():
        plan_loras = len({s.lora_id for s in engine.scheduler.running if s.lora_id})
        lora_steps += plan_loras == 3
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
    assert lora_steps > 0  # some steps ran all three adapters together
    for name in names:
        for i in range(len(PROMPTS)):
            assert got[f"{i}/{name}"] == expected[name][i], (name, i)
    # every adapter changes what the base model says
    for name in peft_adapters:
        assert expected[name] != expected[None]
    assert engine.scheduler.kv.pool.num_used == 0
