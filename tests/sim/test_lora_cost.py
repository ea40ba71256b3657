"""The twin prices LoRA: per step, each distinct adapter's weights once and each adapted row's
FLOPs; multi-step plans pay it per sub-step; workloads name adapters and the scheduler's
``max_loras`` holds in simulation as in the engine."""

from __future__ import annotations

import pytest

from tests.sim.test_simulator import sched
from tokenmill.core.plan import ScheduledSeq, StepPlan
from tokenmill.sim import workload as W
from tokenmill.sim.config import PoolConfig, SimConfig
from tokenmill.sim.cost_model import plan_features
from tokenmill.sim.hardware import get_hardware
from tokenmill.sim.model_spec import ModelShape
from tokenmill.sim.roofline import RooflineCostModel
from tokenmill.sim.simulator import simulate

SHAPE = ModelShape.load("llama-3-8b")


def decode_plan(loras: list[int], num_steps: int = 1) -> StepPlan:
    seqs = [ScheduledSeq(str(i), 100, 1, [1], 0, [], True, lora_id=lid) for i, lid in enumerate(loras)]
    return StepPlan(1, 0.0, seqs, num_steps=num_steps)


def test_lora_cost_grows_with_distinct_adapters_not_requests() -> None:
    cm = RooflineCostModel(SHAPE, get_hardware("h100"), lora_rank=16)
    base = cm.plan_time(decode_plan([0] * 32))
    one = cm.plan_time(decode_plan([1] * 32))
    eight = cm.plan_time(decode_plan([1 + i % 8 for i in range(32)]))
    f = plan_features(decode_plan([1 + i % 8 for i in range(32)]))
    assert (f.num_loras, f.lora_tokens) == (8, 32)
    assert base < one < eight
    # decode is memory bound: each adapter's A and B once (rank x (in + out) per projection),
    # and each row reads x and h and reads and writes its output columns; bf16, 32 layers
    dims = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336), (14336, 4096)]
    weights = sum(16 * (i + o) for i, o in dims) * 2 * 32
    acts = sum(i + 16 + 2 * o for i, o in dims) * 2 * 32
    assert eight - base == pytest.approx(cm.lora_time(8, 32))
    assert cm.lora_time(8, 32) == pytest.approx((8 * weights + 32 * acts) / cm.B)
    assert cm.lora_time(8, 32) - cm.lora_time(1, 32) == pytest.approx(7 * weights / cm.B)
    assert "lora" in cm.breakdown(f) and cm.breakdown(plan_features(decode_plan([0] * 4))).get("lora") is None
    # a k-step plan pays the adapters in every sub-step
    k = 5
    assert cm.plan_time(decode_plan([1, 2] * 4, k)) - cm.plan_time(decode_plan([0] * 8, k)) == pytest.approx(
        k * cm.lora_time(2, 8)
    )
    only_attn = RooflineCostModel(SHAPE, get_hardware("h100"), lora_rank=16, lora_targets=("q_proj", "v_proj"))
    assert only_attn.lora_time(8, 32) < cm.lora_time(8, 32) / 5
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        RooflineCostModel(SHAPE, get_hardware("h100"), lora_targets=("embed_tokens",))


def test_simulated_adapters_respect_max_loras(tmp_path) -> None:  # type: ignore[no-untyped-def]
    wl = W.synthetic(60, 20.0, "fixed:200", "fixed:50", seed=3)
    for i, r in enumerate(wl.requests):
        r.lora = f"adapter-{i % 4}"
    path = tmp_path / "trace.jsonl"
    wl.to_jsonl(path)
    wl = W.from_jsonl(path)
    assert {r.lora for r in wl.requests} == {f"adapter-{i}" for i in range(4)}
    cm = RooflineCostModel(SHAPE, get_hardware("h100"))
    seen: list[int] = []
    orig = cm.plan_time

    def spy(plan: StepPlan) -> float:
        seen.append(len({s.lora_id for s in plan.seqs if s.lora_id}))
        return orig(plan)

    cm.plan_time = spy  # type: ignore[method-assign]
    res = simulate(wl, SimConfig(PoolConfig(sched(max_loras=2), cm)))
    assert res.summary["completed"] == 60 and max(seen) == 2
    free = simulate(wl, SimConfig(PoolConfig(sched(), RooflineCostModel(SHAPE, get_hardware("h100")))))
    assert free.summary["completed"] == 60
    assert free.summary["duration_s"] <= res.summary["duration_s"]
