"""The twin's speed-ups change no result: fixed workloads give the per-request results they gave before.

``data/twin_golden.json`` holds, for a few fixed workloads, every request's
first-token time, finish time, output length, preemptions and cached prompt
tokens, plus the number of plans and steps and a digest of every plan's
decisions, as the simulator produced them before its speed-ups (lean plans,
keys cut in place, the faster roofline pricing). Any change to a decision or
a timestamp, down to the last bit of a float, fails here. A change that is
meant to alter decisions regenerates the file, with the reason in its commit:

    python tests/sim/test_twin_golden.py --write

The workloads: one replica under KV pressure with shared prefixes
(preemptions, prefix hits, multi-step plans); four replicas behind a
load-aware router (arrivals cut plans); the speed benchmark's configuration
(Llama-2-70B TP8 roofline, Azure lengths, round-robin) at 8 replicas; and
prefill/decode disaggregation.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tokenmill.core.scheduler import SchedulerConfig
from tokenmill.sim import workload as W
from tokenmill.sim.config import PoolConfig, SimConfig
from tokenmill.sim.hardware import get_hardware
from tokenmill.sim.model_spec import ModelShape
from tokenmill.sim.roofline import RooflineCostModel
from tokenmill.sim.simulator import Simulator

GOLDEN = Path(__file__).parent / "data" / "twin_golden.json"


def _sched(**kw: Any) -> SchedulerConfig:
    base: dict[str, Any] = dict(num_blocks=2000, block_size=16, max_num_seqs=32, max_num_batched_tokens=1024,
                                max_model_len=4096, max_decode_steps=256)  # fmt: skip
    base.update(kw)
    return SchedulerConfig(**base)


def _cases() -> dict[str, tuple[W.Workload, SimConfig]]:
    roof8 = RooflineCostModel(ModelShape.load("llama-3-8b"), get_hardware("h100"))
    tight = W.synthetic(300, 60.0, "lognormal:300,0.8", "lognormal:80,0.8", shared_prefix_groups=3,
                        shared_prefix_len=64, seed=2)  # fmt: skip
    cluster = W.synthetic(400, 40.0, "lognormal:400,0.8", "lognormal:100,0.8", shared_prefix_groups=5,
                          shared_prefix_len=48, seed=3)  # fmt: skip
    big = ModelShape.load("llama-2-70b")
    roof70 = RooflineCostModel(big, get_hardware("h100"), tp=8)
    azure = W.from_azure_csv(num_requests=1500, arrival="poisson", rate=16.0, seed=0)
    azure.clip(big.max_model_len)
    azure_sched = SchedulerConfig(num_blocks=roof70.num_kv_blocks(16), block_size=16, max_num_seqs=256,
                                  max_num_batched_tokens=8192, max_model_len=big.max_model_len,
                                  max_decode_steps=1024)  # fmt: skip
    disagg = W.synthetic(150, 10.0, "lognormal:800,0.6", "lognormal:60,0.6", seed=5)
    kvb = ModelShape.load("llama-3-8b").kv_bytes_per_token(2)
    return {
        "one_replica_kv_pressure": (tight, SimConfig(PoolConfig(_sched(num_blocks=250), roof8))),
        "four_replicas_least_load": (cluster, SimConfig(PoolConfig(_sched(num_blocks=600), roof8, num_replicas=4,
                                                                    router="least_outstanding_tokens"))),  # fmt: skip
        "azure_llama70b_8_replicas": (azure, SimConfig(PoolConfig(azure_sched, roof70, num_replicas=8, gpus_per_replica=8))),
        "disaggregated": (disagg, SimConfig(PoolConfig(_sched(), roof8, num_replicas=2, router="least_outstanding_tokens"),
                                            prefill_pool=PoolConfig(_sched(), roof8), kv_bytes_per_token=kvb)),  # fmt: skip
    }


def _run(wl: W.Workload, cfg: SimConfig) -> dict[str, Any]:
    cfg.record_plans = True
    sim = Simulator(wl, cfg)
    res = sim.run()
    r = res.records
    rows = sorted(zip(r.index, r.first_token, r.finish, r.output_len, r.preemptions, r.cached_tokens, strict=True))
    return {
        "plans": res.num_plans,
        "steps": res.num_steps,
        "plan_digest": hashlib.sha256(repr(_decisions(sim.plan_log)).encode()).hexdigest(),
        "requests": [list(row) for row in rows],
    }


@pytest.mark.parametrize("name", sorted(_cases()))
def test_per_request_results_unchanged(name: str) -> None:
    want = json.loads(GOLDEN.read_text())[name]
    got = _run(*_cases()[name])
    assert got["plans"] == want["plans"] and got["steps"] == want["steps"]
    assert got["plan_digest"] == want["plan_digest"], "a plan's decisions changed"
    assert len(got["requests"]) == len(want["requests"])
    for g, w in zip(got["requests"], want["requests"], strict=True):
        assert g == w, f"request {w[0]}: (index, first token, finish, output, preemptions, cached) was {w}, now {g}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/sim/test_twin_golden.py --write")
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({name: _run(*case) for name, case in _cases().items()}) + "\n")
    print(f"wrote {GOLDEN}")


def _decisions(plan_log: list) -> list:
    """Each plan's decisions as the golden file recorded them: (replica, (steps, per sequence
    (id, start, new tokens, samples), preempted)); fields a plan summary gained later (a decode's
    draft count) are left out, and must be zero here: these workloads do not speculate."""
    out = []
    for replica, (steps, seqs, preempted) in plan_log:
        assert all(not extra for s in seqs for extra in s[4:])
        out.append((replica, (steps, tuple(tuple(s[:4]) for s in seqs), preempted)))
    return out
