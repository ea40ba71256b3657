"""The engine's step loop on a tiny model: fan-out share and the per-request token budget."""

from __future__ import annotations

import pytest

from tokenmill.core.request import SamplingParams
from tokenmill.engine import Engine, EngineConfig


def make_engine(tiny_model_dir, **kw) -> Engine:
    base = dict(model=str(tiny_model_dir("llama")), dtype="float32", kv_cache_memory=8 << 20)
    base.update(kw)
    return Engine(EngineConfig(**base))


def test_a_short_request_is_served_within_a_plan_of_a_big_fan_out(tiny_model_dir) -> None:
    # n=12 ignore_eos samples on 4 running slots: 3 rounds of 20 decodes under plain arrival order.
    engine = make_engine(tiny_model_dir, max_num_seqs=4, max_decode_steps=4, max_seqs_per_request=2)
    engine.add_request("big", [5, 6, 7, 8], SamplingParams(n=12, max_tokens=20, ignore_eos=True, temperature=0))
    for _ in range(3):
        engine.step()
    engine.add_request("short", [9, 10, 11], SamplingParams(max_tokens=3, ignore_eos=True, temperature=0))
    plans = steps = 0
    while True:
        before = engine.num_steps
        outs = {o.request_id: o for o in engine.step()}
        plans += engine.num_steps - before
        if "short" in outs and outs["short"].outputs[0].token_ids:
            break
        assert plans < 3, "the short request waited for the fan-out"
    assert plans == 1  # first token in the first plan after it arrived
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
        steps += 1
    # Samples that gave up their slots for it still give the same greedy text.
    outs = done["big"].outputs
    assert len(outs) == 12 and all(o.token_ids == outs[0].token_ids and len(o.token_ids) == 20 for o in outs)
    assert engine.scheduler.kv.pool.num_used == 0


def test_max_tokens_per_request_bounds_n_times_max_tokens(tiny_model_dir) -> None:
    engine = make_engine(tiny_model_dir, max_tokens_per_request=100, max_model_len=64)
    engine.add_request("ok", [5, 6], SamplingParams(n=4, max_tokens=25))
    with pytest.raises(ValueError, match="max_tokens_per_request"):
        engine.add_request("too-many", [5, 6], SamplingParams(n=4, max_tokens=26))
    # max_tokens=None asks for the rest of the context: 62 tokens, twice.
    with pytest.raises(ValueError, match="124"):
        engine.add_request("open-ended", [5, 6], SamplingParams(n=2, max_tokens=None))
    assert engine.scheduler.num_waiting == 4  # only "ok" got in
    with pytest.raises(ValueError, match="max_tokens_per_request"):
        make_engine(tiny_model_dir, max_tokens_per_request=0)


def test_serve_flags_reach_the_engine_config(monkeypatch) -> None:
    import tokenmill.engine
    from tokenmill.cli import main

    seen: list[EngineConfig] = []

    class Stop(Exception):
        pass

    def fake_engine(config: EngineConfig) -> Engine:
        seen.append(config)
        raise Stop

    monkeypatch.setattr(tokenmill.engine, "Engine", fake_engine)
    with pytest.raises(Stop):
        main(["serve", "--max-seqs-per-request", "3", "--max-tokens-per-request", "5000"])
    assert seen[0].max_seqs_per_request == 3 and seen[0].max_tokens_per_request == 5000
    with pytest.raises(Stop):
        main(["serve"])
    assert seen[1].max_seqs_per_request == 8 and seen[1].max_tokens_per_request is None
