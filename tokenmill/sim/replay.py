"""Record an engine run and replay it in the twin: do both make the same decisions?

A recording holds, per plan, the requests added since the previous plan, the
plan's summary (``StepPlan.summary()``) and its measured duration. The twin
replays it with a ``ReplayCostModel`` that returns those durations, with each
request arriving in the middle of the plan before the one it was added
before, on the twin's own clock; then the two sequences of plan summaries
must be equal.

- An engine that plans up to ``max_decode_steps`` blind to arrivals is
  replayed in the twin's ``engine`` mode, plan for plan.
- An engine that steps one decode at a time is replayed in the ``ideal``
  mode with multi-step planning on; the twin's k-step plans are expanded
  into k single steps before comparing (``expand_summaries``).

Drivers: ``record_engine`` runs a real ``tokenmill.engine.Engine`` (which
records its steps when ``EngineConfig.record_steps`` is set);
``record_scheduler`` runs the same engine loop around any executor (a test
fake), timing each plan with the wall clock.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tokenmill.core.plan import StepPlan, StepResult
from tokenmill.core.request import SamplingParams
from tokenmill.core.scheduler import SchedulerConfig
from tokenmill.sim.config import PoolConfig, SimConfig
from tokenmill.sim.cost_model import ReplayCostModel
from tokenmill.sim.simulator import Simulator
from tokenmill.sim.workload import RequestSpec, Workload


@dataclass
class ArrivalPlan:
    """Requests to add before given plan indices: (plan index, prompt tokens, output length)."""

    entries: list[tuple[int, list[int], int]]

    def request_id(self, i: int) -> str:
        return str(i)  # the simulator names requests by their index in arrival order


@dataclass
class Recording:
    scheduler: SchedulerConfig
    added_before: list[list[str]] = field(default_factory=list)  # per plan
    summaries: list[tuple] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    requests: dict[str, tuple[list[int], int]] = field(default_factory=dict)  # id -> (prompt, output length)


class _Executor(Protocol):
    num_blocks: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]

    def execute(self, plan: StepPlan, on_substep: Any = None) -> StepResult: ...


def _params(output_len: int) -> SamplingParams:
    return SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)


def record_scheduler(config: SchedulerConfig, executor: _Executor, arrivals: ArrivalPlan,
                     clock: Any = time.perf_counter) -> Recording:  # fmt: skip
    """Drive an ``Engine`` around ``executor`` (any ``Executor``, e.g. a test fake), timing
    each plan with ``clock``: the scheduler is configured by ``config``."""
    from tokenmill.engine import Engine, EngineConfig

    names = {f.name for f in dataclasses.fields(EngineConfig)}
    shared = {k: v for k, v in dataclasses.asdict(config).items() if k in names}
    engine = Engine(EngineConfig(**shared, record_steps=True), clock, executor=executor)
    if engine.scheduler.config.num_blocks != config.num_blocks:
        raise ValueError(f"the executor has {engine.scheduler.config.num_blocks} blocks, the config {config.num_blocks}")
    return record_engine(engine, arrivals)


def record_engine(engine: Any, arrivals: ArrivalPlan) -> Recording:
    """Drive a real ``Engine`` (built with ``record_steps=True``) through ``arrivals``."""
    if not engine.config.record_steps:
        raise ValueError("build the engine with EngineConfig(record_steps=True)")
    rec = Recording(dataclasses.replace(engine.scheduler.config))
    pending = sorted(enumerate(arrivals.entries), key=lambda e: e[1][0])
    pos = 0
    start = len(engine.step_log)
    while pos < len(pending) or engine.has_unfinished():
        plan_index = len(engine.step_log) - start
        while pos < len(pending) and (pending[pos][1][0] <= plan_index or not engine.has_unfinished()):
            i, (_, prompt, out) = pending[pos]
            rid = arrivals.request_id(i)
            engine.add_request(rid, prompt, _params(out))
            rec.requests[rid] = (prompt, out)
            pos += 1
        engine.step()
    for r in engine.step_log[start:]:
        rec.added_before.append(list(r.added_before))
        rec.summaries.append(r.summary)
        rec.durations.append(r.duration)
    return rec


def replay_workload(rec: Recording) -> Workload:
    """The recording's requests, arriving mid-way through the plan before the one they joined."""
    t = 0.0
    times = []
    for d in rec.durations:
        times.append(t)
        t += d
    specs: dict[str, RequestSpec] = {}
    for j, added in enumerate(rec.added_before):
        at = times[j] - (rec.durations[j - 1] / 2 if j > 0 else 0.0)
        for rid in added:
            prompt, out = rec.requests[rid]
            specs[rid] = RequestSpec(at, len(prompt), out, prompt_tokens=list(prompt))
    ordered = [specs[k] for k in sorted(specs, key=int)]
    return Workload(ordered, vocab_size=1 << 30, description={"kind": "replay"})


def replay(rec: Recording, mode: str = "engine", max_decode_steps: int | None = None) -> list[tuple]:
    """Run the twin on the recording; returns its plan summaries in order.

    ``mode="engine"`` replays plan for plan (durations per plan);
    ``mode="ideal"`` expects a single-stepping recording (durations per step)
    and may plan up to ``max_decode_steps`` (default 64) steps at once.
    """
    cfg = dataclasses.replace(rec.scheduler)
    if mode == "ideal":
        cfg.max_decode_steps = max_decode_steps or 64
        cost = ReplayCostModel(rec.durations, per_plan=False)
    else:
        cost = ReplayCostModel(rec.durations, per_plan=True)
    sim = Simulator(replay_workload(rec), SimConfig(PoolConfig(cfg, cost), mode=mode, record_plans=True))
    sim.run()
    return [s for _, s in sim.plan_log]


def expand_summaries(summaries: Sequence[tuple]) -> list[tuple]:
    """Split each k-step plan summary into the k single-step summaries it stands for."""
    out: list[tuple] = []
    for k, seqs, preempted in summaries:
        if k == 1:
            out.append((k, seqs, preempted))
            continue
        for j in range(k):
            out.append((1, tuple((rid, start + j, 1, True, 0) for rid, start, *_ in seqs), ()))
    return out
