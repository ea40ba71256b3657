"""Acceptance: greedy outputs are token-identical on one engine, on two replicas and on prefill/decode.

Sixteen prompts of different lengths, some sharing a long prefix, all at
once; the cluster's outputs (what a streaming client assembles from the
deltas) must equal a single in-process engine's. Under prefill/decode the
decode replica computes no prompt token, and the KV bytes moved are the
blocks moved times the bytes of a block.
"""

from __future__ import annotations

import random
from typing import Any

from tests.cluster.conftest import front_end
from tests.cluster.helpers import final_tokens, run_all
from tokenmill.core.request import SamplingParams
from tokenmill.engine import Engine


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(5, 300) for _ in range(48)]
    out = []
    for i in range(16):
        tail = [rng.randrange(5, 300) for _ in range(rng.randint(1, 90))]
        out.append(shared + tail if i % 3 == 0 else tail)
    return out


def _requests(prompts: list[list[int]], tag: str) -> list[tuple[str, list[int], SamplingParams]]:
    return [(f"{tag}{i}", p, SamplingParams(max_tokens=10 + i % 7, temperature=0.0)) for i, p in enumerate(prompts)]


def test_greedy_outputs_identical_across_one_engine_two_replicas_and_pd(replicas: Any, engine_config: Any) -> None:
    prompts = _prompts(1)
    single = Engine(engine_config)
    want = {}
    for rid, prompt, params in _requests(prompts, "x"):
        single.add_request(rid, prompt, params)
        while single.has_unfinished():
            for out in single.step():
                if out.finished:
                    want[int(out.request_id[1:])] = out.outputs[0].token_ids

    two = front_end(replicas, 2)
    got = run_all(two, _requests(prompts, "r"))
    assert {int(k[1:]): final_tokens(v) for k, v in got.items()} == want
    assert {rep for _, _, rep, _ in two.routing_log} == {0, 1}

    states: dict[str, Any] = {}

    async def read_states(engine: Any) -> None:
        for h in engine.replicas:
            states[h.role] = await h.actor.state.remote()
        await engine.collect_metrics()

    actors, infos = replicas
    before = {"decode": _state(actors[1])}
    pd = front_end(replicas, 2, pd=(1, 1))
    got = run_all(pd, _requests(prompts, "p"), after=read_states)
    assert {int(k[1:]): final_tokens(v) for k, v in got.items()} == want
    # The decode replica computed no prompt token: every prompt's KV came from the prefill replica
    # (or was in its own prefix cache).
    assert states["decode"]["num_prompt_tokens"] == before["decode"]["num_prompt_tokens"]
    m = pd.metrics
    blocks = m.kv_transfer_blocks.labels(model_name="tiny")._value.get()
    reused = m.kv_reused_blocks.labels(model_name="tiny")._value.get()
    assert m.kv_transfers.labels(model_name="tiny")._value.get() == 16
    assert blocks + reused == sum(-(-len(p) // 16) for p in prompts)
    assert m.kv_transfer_bytes.labels(model_name="tiny")._value.get() == blocks * infos[0]["block_bytes"] > 0
    assert states["decode"]["used_blocks"] == 0 and states["prefill"]["held"] == 0


def _state(actor: Any) -> dict[str, Any]:
    import ray

    return ray.get(actor.state.remote())
