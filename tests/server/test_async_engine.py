"""The async engine streams each token of a multi-step decode plan when it is sampled.

A plan may cover ``max_decode_steps`` decode steps; the executor reports each
sub-step's tokens to the engine, which publishes them at once (checked against
the request's stop rules, so nothing past a stop leaves the engine), while the
scheduling state still changes only in ``update`` at the end of the plan.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tokenmill.core.request import SamplingParams
from tokenmill.engine import Engine, EngineConfig
from tokenmill.server.async_engine import AsyncEngine

SUB_STEP_S = 0.03  # each forward pass is slowed to this, so sub-steps are far apart


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Any) -> Engine:
    e = Engine(EngineConfig(model=str(tiny_model_dir("llama")), dtype="float32", kv_cache_memory=8 << 20,
                            max_decode_steps=8))  # fmt: skip
    return e


def _slow_forwards(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    starts: list[float] = []
    real = engine.executor._forward

    def slow(batch: Any) -> Any:
        starts.append(time.monotonic())
        time.sleep(SUB_STEP_S)
        return real(batch)

    monkeypatch.setattr(engine.executor, "_forward", slow)
    return starts


def _stream(engine: Engine, prompt: list[int], params: SamplingParams) -> list[tuple[float, Any]]:
    async def main() -> list[tuple[float, Any]]:
        ae = AsyncEngine(engine)
        ae.start()
        try:
            stream, _ = await ae.add_request("r", prompt, params)
            return [(time.monotonic(), out) async for out in stream]
        finally:
            await ae.stop()

    return asyncio.run(main())


def _offline(engine: Engine, prompt: list[int], params: SamplingParams) -> Any:
    engine.add_request("offline", prompt, params)
    while True:
        for out in engine.step():
            if out.finished:
                return out.outputs[0]


def test_each_token_of_a_multi_step_plan_is_streamed_when_sampled(engine: Engine, monkeypatch) -> None:
    starts = _slow_forwards(engine, monkeypatch)
    steps_before = engine.num_steps
    got = _stream(engine, [5, 6, 7], SamplingParams(max_tokens=17, ignore_eos=True, temperature=0))
    plans = engine.num_steps - steps_before
    assert plans <= 4, "the decode ran in multi-step plans"
    deltas = [len(out.outputs[0].delta_token_ids) for _, out in got]
    assert deltas == [1] * 17, "one output per token, no bursts"
    # Token j comes from forward j; it reaches the client before forward j + 2 starts
    # (a burst would hold token j until the plan's last forward had run).
    arrivals = [t for t, _ in got]
    for j in range(len(arrivals) - 2):
        assert arrivals[j] < starts[j + 2], f"token {j} was held back"
    gaps = [b - a for a, b in zip(arrivals[1:], arrivals[2:], strict=False)]
    assert max(gaps) < 4 * SUB_STEP_S


@pytest.mark.parametrize("kind", ["stop_token_ids", "stop", "eos"])
def test_a_stop_inside_a_multi_step_plan_leaks_nothing(engine: Engine, kind: str, monkeypatch) -> None:
    prompt = [9, 8, 7, 6]
    free = _offline(engine, prompt, SamplingParams(max_tokens=24, ignore_eos=True, temperature=0))
    j = 12  # a stop at token 12 falls inside the second 8-step plan
    if kind == "stop_token_ids":
        params = SamplingParams(max_tokens=24, stop_token_ids=[free.token_ids[j]], temperature=0, ignore_eos=True)
        j = free.token_ids.index(free.token_ids[j])
        want_ids, want_text = free.token_ids[: j + 1], None
    elif kind == "stop":
        # a stop string of plain characters that first shows up past the first plan
        start = len(engine.tokenizer.decode(free.token_ids[:10], skip_special_tokens=True))
        stop = next(free.text[i : i + 2] for i in range(start, len(free.text) - 1)
                    if free.text[i : i + 2].isascii() and free.text[i : i + 2].isprintable()
                    and free.text.index(free.text[i : i + 2]) == i)  # fmt: skip
        params = SamplingParams(max_tokens=24, stop=[stop], temperature=0, ignore_eos=True)
        want_ids, want_text = None, free.text[: free.text.index(stop)]
    else:
        eos = free.token_ids[j]
        j = free.token_ids.index(eos)
        monkeypatch.setattr(engine, "eos_token_ids", (eos,))  # the engine hands its EOS ids to each request
        params = SamplingParams(max_tokens=24, temperature=0)
        want_ids, want_text = free.token_ids[: j + 1], None
    offline = _offline(engine, prompt, params)
    got = _stream(engine, prompt, params)
    streamed_ids = [t for _, out in got for t in out.outputs[0].delta_token_ids]
    streamed_text = "".join(out.outputs[0].delta_text for _, out in got)
    final = got[-1][1].outputs[0]
    assert final.finish_reason == "stop"
    assert streamed_ids == final.token_ids == offline.token_ids
    assert streamed_text == final.text == offline.text
    if want_ids is not None:
        assert streamed_ids == want_ids
    if want_text is not None:
        assert streamed_text == want_text
        # no token past the one that completed the stop string
        tok = engine.tokenizer
        assert stop in tok.decode(streamed_ids, skip_special_tokens=True)
        assert stop not in tok.decode(streamed_ids[:-1], skip_special_tokens=True)
