"""Acceptance: given the measured step times, the twin routes every request where the real front end did.

A workload with staggered arrivals runs on two real replicas behind the
``least_outstanding_tokens`` and ``prefix_aware`` routers (their choices
depend on which requests have finished and which prefixes went where, so on
timing). The run is recorded (``cluster/record.py``) and replayed in the twin
(``sim/cluster_replay.py``): every routing decision, and every plan of every
replica, must be the same.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from tests.cluster.conftest import front_end
from tokenmill.cluster.record import plan_counts, recording, run_workload
from tokenmill.core.request import SamplingParams
from tokenmill.sim.cluster_replay import replay_cluster


def _workload(seed: int) -> list[tuple[str, float, list[int], SamplingParams]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(5, 300) for _ in range(rng.choice([32, 48]))] for _ in range(3)]
    out, t = [], 0.0
    for i in range(28):
        t += rng.expovariate(1 / 0.03)
        prompt = [rng.randrange(5, 300) for _ in range(rng.randint(2, 60))]
        if rng.random() < 0.5:
            prompt = rng.choice(prefixes) + prompt
        params = SamplingParams(max_tokens=rng.randint(2, 48), temperature=0.0, ignore_eos=True)
        out.append((f"t{seed}-{i}", t, prompt, params))
    return out


@pytest.mark.parametrize("router", ["least_outstanding_tokens", "prefix_aware"])
def test_twin_routes_like_the_front_end(replicas: Any, engine_config: Any, router: str) -> None:
    engine = front_end(replicas, 2, router=router)
    requests = _workload(11 if router == "prefix_aware" else 5)
    info = engine.replicas[0].info
    scheduler = engine_config.scheduler_config(info["num_blocks"], info["max_model_len"])

    async def main() -> Any:
        engine.start()
        try:
            starts = await plan_counts(engine)
            # The last ten arrive once a request has finished (on a loaded machine, fixed offsets
            # alone may route every request before the first finish), while others still run.
            first = asyncio.ensure_future(run_workload(engine, requests[:18], timeout=120))
            while not engine.finish_log and not first.done():
                await asyncio.sleep(0.002)
            t0 = requests[18][1]
            await run_workload(engine, [(rid, at - t0, p, sp) for rid, at, p, sp in requests[18:]], timeout=120)
            await first
            return await recording(engine, requests, starts, scheduler)
        finally:
            await engine.stop()

    rec = asyncio.run(main())
    real = {rid: replica for rid, (replica, _) in rec.routed.items()}
    assert set(real.values()) == {0, 1}
    # The decisions depended on finishes: some requests were routed after others had finished.
    first_finish = min(rec.finished.values())
    assert sum(t > first_finish for _, t in rec.routed.values()) >= 10

    routed, plans = replay_cluster(rec)
    assert routed == real
    for replica, log in enumerate(rec.replicas):
        assert plans[replica] == [summary for _, summary, _, _ in log.plans]
