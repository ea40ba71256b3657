"""Run a workload through a ``ClusterEngine`` in wall time, and record what the twin needs to replay it.

``run_workload`` adds each request when its arrival time comes (relative to
the start), streams every request to its end, and returns per request the
front end's times (arrival, first token, finish) and output length.
``recording`` then gathers the front end's routing and finish logs and each
replica's plans since the run began into a ``ClusterRecording``
(``sim/cluster_replay.py``). Used by ``tokenmill sim validate --replicas``
and the tests.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tokenmill.core.request import SamplingParams
from tokenmill.server.async_engine import RequestStream


async def run_workload(engine: Any, requests: list[tuple[str, float, list[int], SamplingParams]],
                       timeout: float = 600.0) -> dict[str, dict[str, float]]:  # fmt: skip
    """Serve ``(id, arrival offset s, prompt ids, params)`` on a started ``engine``; per id the front
    end's ``arrival``, ``first`` token and ``finish`` times and ``n_out`` tokens."""
    clock = engine.clock
    start = clock()
    times: dict[str, dict[str, float]] = {}

    async def one(rid: str, at: float, prompt: list[int], params: SamplingParams) -> None:
        delay = start + at - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        t = times[rid] = {"arrival": clock(), "first": float("nan"), "finish": float("nan"), "n_out": 0}
        stream = RequestStream()
        await engine.add_requests([(rid, prompt, params)], stream)
        async for out in stream:
            now = clock()
            o = out.outputs[0]
            if o.token_ids and t["first"] != t["first"]:
                t["first"] = now
            t["n_out"] = len(o.token_ids)
            if out.finished:
                t["finish"] = now

    await asyncio.wait_for(asyncio.gather(*(one(*r) for r in requests)), timeout)
    return times


async def recording(engine: Any, requests: list[tuple[str, float, list[int], SamplingParams]],
                    plan_starts: list[int], scheduler: Any) -> Any:  # fmt: skip
    """The ``ClusterRecording`` of a run of ``requests`` on ``engine`` (built with ``routing_log`` and
    ``finish_log`` lists), whose replicas had made ``plan_starts`` plans before it began."""
    from tokenmill.sim.cluster_replay import ClusterRecording, ReplicaLog

    logs = [ReplicaLog(list(await r.actor.step_log.remote(s))) for r, s in zip(engine.replicas, plan_starts, strict=True)]
    router = engine.router
    options = {k: getattr(router, a) for k, a in (("block_size", "block_size"), ("max_blocks_per_replica", "max_blocks"),
                                                  ("min_match_ratio", "min_match_ratio"),
                                                  ("balance_abs_threshold", "balance_abs"),
                                                  ("balance_rel_threshold", "balance_rel")) if hasattr(router, a)}  # fmt: skip
    return ClusterRecording(
        scheduler=scheduler,
        router=router.name,
        router_options=options,
        requests={rid: (list(prompt), params.max_tokens) for rid, _, prompt, params in requests},
        routed={rid: (replica, t) for rid, _, replica, t in engine.routing_log},
        finished=dict(engine.finish_log),
        replicas=logs,
    )


async def plan_counts(engine: Any) -> list[int]:
    """How many plans each replica has made so far (where a new run's plans begin)."""
    return [(await r.actor.state.remote())["num_steps"] for r in engine.replicas]
