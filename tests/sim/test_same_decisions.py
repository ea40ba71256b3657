"""Acceptance: the twin, fed the measured step times of a run, makes the same decisions.

A workload runs with requests joining at chosen plans, under KV pressure
(preemptions happen) and with shared prompt prefixes (the prefix cache
matters). The run records each plan's summary and measured duration; the
twin replays it with a cost model that returns those durations, and the two
sequences of plans must be identical:

- against a bare scheduler with the KV-checking fake executor (fast);
- against the real ``Engine`` on a tiny random-weight Llama written with
  transformers' ``save_pretrained`` (the ``tiny_model_dir`` fixture).

Engines that plan several decode steps blind to arrivals are replayed plan
for plan (``engine`` mode); a single-stepping engine is replayed by the
twin's ``ideal`` mode, whose multi-step plans expand into the same steps.
"""

from __future__ import annotations

import random

import pytest

from tests.core.fake_executor import FakeKVExecutor
from tokenmill.core.scheduler import SchedulerConfig
from tokenmill.sim.replay import (
    ArrivalPlan,
    expand_summaries,
    record_engine,
    record_scheduler,
    replay,
)


def _arrivals(seed: int, n: int, vocab: int, max_prompt: int, max_out: int, span: int) -> ArrivalPlan:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(vocab) for _ in range(rng.randint(8, 24))] for _ in range(3)]
    entries = []
    for _ in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, max_prompt))]
        if rng.random() < 0.5:
            prompt = rng.choice(prefixes) + prompt
        entries.append((rng.randint(0, span), prompt, rng.randint(1, max_out)))
    entries.sort(key=lambda e: e[0])
    return ArrivalPlan(entries)


@pytest.mark.parametrize("seed", [0, 1])
def test_twin_replays_fake_engine_plan_for_plan(seed: int) -> None:
    cfg = SchedulerConfig(num_blocks=48, block_size=4, max_num_seqs=8, max_num_batched_tokens=32,
                          max_model_len=128, max_decode_steps=4)  # fmt: skip
    rec = record_scheduler(cfg, FakeKVExecutor(48, 4), _arrivals(seed, 40, 96, 50, 40, 120))
    assert any(s[2] for s in rec.summaries), "the workload should preempt"
    assert any(s[0] > 1 for s in rec.summaries), "the engine should plan multi-step"
    assert replay(rec, "engine") == rec.summaries


@pytest.mark.parametrize("seed", [0, 1])
def test_twin_multistep_equals_single_stepping_engine(seed: int) -> None:
    cfg = SchedulerConfig(num_blocks=48, block_size=4, max_num_seqs=8, max_num_batched_tokens=32,
                          max_model_len=128, max_decode_steps=1)  # fmt: skip
    rec = record_scheduler(cfg, FakeKVExecutor(48, 4), _arrivals(seed, 40, 96, 50, 40, 120))
    twin = replay(rec, "ideal", max_decode_steps=64)
    assert len(twin) < len(rec.summaries), "the twin should have jumped over decode runs"
    assert expand_summaries(twin) == rec.summaries


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_twin_replays_real_engine(tiny_model_dir, decode_steps: int) -> None:
    from tokenmill.engine import Engine, EngineConfig

    path = tiny_model_dir("llama")
    # 2 layers x (K, V) x 16 tokens x 2 KV heads x 16 dims x 4 bytes = 8 KiB a block: 24 blocks.
    engine = Engine(EngineConfig(model=str(path), dtype="float32", kv_cache_memory=24 * 8192, block_size=16,
                                 max_num_seqs=8, max_num_batched_tokens=64, max_decode_steps=decode_steps,
                                 record_steps=True))  # fmt: skip
    assert engine.scheduler.config.num_blocks == 24
    rec = record_engine(engine, _arrivals(3, 24, 320, 90, 80, 8))
    assert any(s[2] for s in rec.summaries), "the workload should preempt"
    if decode_steps == 1:
        assert expand_summaries(replay(rec, "ideal", max_decode_steps=64)) == rec.summaries
    assert replay(rec, "engine") == rec.summaries
