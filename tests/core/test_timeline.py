"""Request timelines: the scheduler records them for engine and twin alike, in the Trace Event Format.

The schema test checks what Perfetto and ``chrome://tracing`` need of each
event (the Trace Event Format document: ``ph``, ``ts`` in microseconds,
``dur`` for complete events, ``s`` for instants, ``pid``/``tid``, metadata
events naming processes and threads), and that complete events on one
thread nest or follow each other, as slices on a track must.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jsonschema_rs

from tests.core.fake_executor import FakeKVExecutor
from tokenmill.core.plan import StepResult
from tokenmill.core.request import Request, SamplingParams
from tokenmill.core.scheduler import Scheduler, SchedulerConfig
from tokenmill.core.timeline import Timeline, chrome_trace

# The Trace Event Format (JSON object form), as far as timelines use it.
TRACE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["traceEvents"],
    "properties": {
        "displayTimeUnit": {"enum": ["ms", "ns"]},
        "otherData": {"type": "object"},
        "traceEvents": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "ph", "pid", "tid"],
                "properties": {
                    "name": {"type": "string"},
                    "cat": {"type": "string"},
                    "ph": {"enum": ["X", "i", "M"]},
                    "ts": {"type": "number", "minimum": 0},
                    "dur": {"type": "number", "minimum": 0},
                    "pid": {"type": "integer"},
                    "tid": {"type": "integer"},
                    "s": {"enum": ["g", "p", "t"]},
                    "args": {"type": "object"},
                },
                "allOf": [
                    {"if": {"properties": {"ph": {"const": "X"}}}, "then": {"required": ["ts", "dur"]}},
                    {"if": {"properties": {"ph": {"const": "i"}}}, "then": {"required": ["ts", "s"]}},
                    {"if": {"properties": {"ph": {"const": "M"}}},
                     "then": {"required": ["args"],
                              "properties": {"name": {"enum": ["process_name", "thread_name", "thread_sort_index",
                                                               "process_sort_index"]}}}},
                ],  # fmt: skip
            },
        },
    },
}


def check_trace(trace: dict[str, Any]) -> None:
    """Schema, JSON round trip, and proper nesting of complete events per thread."""
    jsonschema_rs.validate(TRACE_SCHEMA, json.loads(json.dumps(trace)))
    by_thread: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            by_thread.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
    for spans in by_thread.values():
        spans.sort(key=lambda s: (s[0], -s[1]))
        stack: list[float] = []
        for t0, t1 in spans:
            while stack and stack[-1] <= t0 + 1e-6:  # microseconds to three decimals: allow the rounding
                stack.pop()
            assert not stack or t1 <= stack[-1] + 1e-6, f"span {t0}-{t1} crosses its parent ending at {stack[-1]}"
            stack.append(t1)


def drive(sched: Scheduler, executor: FakeKVExecutor, arrivals: list[tuple[float, list[int], int]],
          step: float = 0.01) -> None:  # fmt: skip
    """Run the scheduler in virtual time: each plan takes ``step`` seconds per sub-step."""
    now, i = 0.0, 0
    pending = sorted(arrivals, key=lambda a: a[0])
    while i < len(pending) or sched.has_unfinished():
        while i < len(pending) and (pending[i][0] <= now or not sched.has_unfinished()):
            t, prompt, out = pending[i]
            now = max(now, t)
            sched.add_request(Request(str(i), prompt, SamplingParams(max_tokens=out, ignore_eos=True),
                                      arrival_time=now), now)  # fmt: skip
            i += 1
        plan = sched.schedule(now)
        if plan.is_empty:
            now = pending[i][0] if i < len(pending) else now
            continue
        result: StepResult = executor.execute(plan)
        result.duration = step * plan.num_steps
        sched.update(plan, result)
        now += result.duration


def _scheduler(num_blocks: int = 48, **kw: Any) -> tuple[Scheduler, FakeKVExecutor]:
    cfg = SchedulerConfig(num_blocks=num_blocks, block_size=4, max_num_seqs=8, max_num_batched_tokens=16,
                          max_model_len=128, max_decode_steps=4, **kw)  # fmt: skip
    sched = Scheduler(cfg)
    sched.timeline = Timeline("test")
    return sched, FakeKVExecutor(num_blocks, 4)


def test_timeline_records_each_request_from_arrival_to_finish() -> None:
    sched, ex = _scheduler(enable_prefix_caching=False)
    arrivals = [(0.0, list(range(1, 40)), 6), (0.005, list(range(2, 12)), 9), (0.05, list(range(3, 8)), 3)]
    drive(sched, ex, arrivals)
    tl = sched.timeline
    assert tl is not None and set(tl.tracks) == {"0", "1", "2"}
    for rid, (_, prompt, out) in zip(("0", "1", "2"), arrivals, strict=True):
        tr = tl.tracks[rid]
        chunks = [(a, b) for k, _, _, a, b in tr.events if k == "prefill"]
        # Chunks cover the prompt in order, within the token budget of 16.
        assert sum(n for _, n in chunks) == len(prompt) and chunks[0][0] == 0 and all(n <= 16 for _, n in chunks)
        assert [a for a, _ in chunks] == [sum(n for _, n in chunks[:j]) for j in range(len(chunks))]
        decode_steps = sum(b for k, _, _, _, b in tr.events if k == "decode")
        assert decode_steps == out - 1  # the last prefill chunk samples the first token
        assert tr.events[0][0] == "queued" and tr.events[0][1] == tr.arrival
        assert tr.arrival <= tr.first_token <= tr.finish and tr.reason == "length" and tr.num_output == out
    # The long first prompt makes the second wait: its queue time is positive.
    q = [e for e in tl.tracks["1"].events if e[0] == "queued"]
    assert q[0][2] > q[0][1]
    assert tl.plans and all(t1 > t0 for t0, t1, *_ in tl.plans)
    check_trace(chrome_trace([tl]))


def test_timeline_records_preemptions_and_requeues() -> None:
    sched, ex = _scheduler(num_blocks=12, enable_prefix_caching=False)
    drive(sched, ex, [(0.0, list(range(1, 9)), 30), (0.0, list(range(2, 10)), 30), (0.0, list(range(3, 11)), 30)])
    tl = sched.timeline
    assert tl is not None
    preempted = {rid for rid, tr in tl.tracks.items() if any(e[0] == "preempted" for e in tr.events)}
    assert preempted, "12 blocks of 4 tokens cannot hold three 38-token requests"
    for rid in preempted:
        kinds = [e[0] for e in tl.tracks[rid].events]
        i = kinds.index("preempted")
        assert kinds[i + 1] == "queued" and "prefill" in kinds[i + 2 :]  # requeued, then recomputed
    assert all(tr.num_output == 30 for tr in tl.tracks.values())
    trace = chrome_trace([tl])
    check_trace(trace)
    assert sum(1 for e in trace["traceEvents"] if e["name"] == "preempted") == sum(
        1 for tr in tl.tracks.values() for e in tr.events if e[0] == "preempted")


def test_chrome_trace_layout_and_origin() -> None:
    sched, ex = _scheduler()
    drive(sched, ex, [(1.0, [5, 6, 7], 2), (1.5, [8, 9], 2)])
    other = Timeline("other", pid=3)
    trace = chrome_trace([sched.timeline, other], metadata={"command": "x"})  # type: ignore[list-item]
    ev = trace["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in ev if e["name"] == "process_name"}
    assert names == {0: "test", 3: "other"}
    threads = {e["args"]["name"] for e in ev if e["name"] == "thread_name"}
    assert threads == {"plans", "request 0", "request 1"}
    arrivals = sorted(e["ts"] for e in ev if e["name"] == "arrival")
    assert arrivals == [0.0, 500000.0]  # microseconds from the earliest arrival
    assert trace["otherData"] == {"command": "x"}
    check_trace(trace)


def test_timeline_bounds_requests_and_aborts_while_waiting() -> None:
    tl = Timeline(max_requests=1)
    sched, _ = _scheduler()
    sched.timeline = tl
    sched.add_request(Request("a", [1, 2], SamplingParams(max_tokens=2), arrival_time=0.0), 0.0)
    sched.add_request(Request("b", [1, 2], SamplingParams(max_tokens=2), arrival_time=0.0), 0.0)
    sched.abort_request("a", 0.25)
    assert set(tl.tracks) == {"a"}
    tr = tl.tracks["a"]
    assert tr.reason == "abort" and tr.first_token is None and tr.events == [("queued", 0.0, 0.25, 0, 0)]
    check_trace(chrome_trace([tl]))


def test_engine_and_twin_write_the_same_decisions() -> None:
    """The engine (fake executor, wall clock) and the twin replaying its durations: one timeline class, same decisions."""
    import random
    import tempfile
    from pathlib import Path

    from tokenmill.engine import Engine, EngineConfig
    from tokenmill.sim.compare import divergence
    from tokenmill.sim.config import PoolConfig, SimConfig
    from tokenmill.sim.cost_model import ReplayCostModel
    from tokenmill.sim.replay import ArrivalPlan, record_engine, replay_workload
    from tokenmill.sim.simulator import Simulator
    from tokenmill.sim.trace_file import read_trace, write_trace

    rng = random.Random(5)
    entries = sorted(((rng.randint(0, 40), [rng.randrange(97) for _ in range(rng.randint(1, 40))], rng.randint(1, 30))
                      for _ in range(24)), key=lambda e: e[0])  # fmt: skip
    cfg = SchedulerConfig(num_blocks=40, block_size=4, max_num_seqs=6, max_num_batched_tokens=24, max_model_len=128,
                          max_decode_steps=4)  # fmt: skip
    # The fields both configs have (speculation is off: the engine's None, the scheduler's 0).
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(EngineConfig)
              if hasattr(cfg, f.name) and f.name != "num_speculative_tokens"}  # fmt: skip
    engine = Engine(EngineConfig(**shared, record_steps=True, timeline_requests=100), time.perf_counter,
                    executor=FakeKVExecutor(40, 4))  # fmt: skip
    rec = record_engine(engine, ArrivalPlan(entries))
    assert any(s[2] for s in rec.summaries), "the workload should preempt"
    sim = Simulator(replay_workload(rec), SimConfig(PoolConfig(dataclasses.replace(rec.scheduler),
                                                               ReplayCostModel(rec.durations, per_plan=True)),
                                                    mode="engine", timeline_requests=100))  # fmt: skip
    res = sim.run()
    with tempfile.TemporaryDirectory() as d:
        write_trace(Path(d) / "e.json", [engine.scheduler.timeline])  # type: ignore[list-item]
        write_trace(Path(d) / "t.json", res.timelines, origin=0.0)
        for f in ("e.json", "t.json"):
            check_trace(json.loads((Path(d) / f).read_text()))
        e, t = read_trace(Path(d) / "e.json"), read_trace(Path(d) / "t.json")
    assert len(e) == len(t) == 24
    rep = divergence(e, t)
    assert rep["matched"] == 24 and rep["first_decision_divergence"] is None
    assert sum(len(r.preempted) for r in e.values()) > 0
