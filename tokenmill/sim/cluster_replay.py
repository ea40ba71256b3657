"""Replay a real cluster run in the twin: does the twin route every request where the front end did?

The front end routes with the core router on its event loop, in the order
it sees arrivals and finishes (``cluster/frontend.py``); the twin runs the
same router over simulated replicas. Given what was measured, the twin must
make the same decisions. A ``ClusterRecording`` holds, on one clock (the
machine's monotonic clock, shared by the front end and replicas on one
host):

- per request: its prompt, output length, when the front end routed it
  and where, and when the front end saw it finish;
- per replica: each plan's summary, start time, measured duration and the
  requests added since the plan before (``Engine.step_log``).

The twin replays it with each replica's plans priced at their measured
times (a ``ReplayCostModel`` per replica, plan for plan, in ``engine``
mode), each request reaching its replica just before the plan it joined
(``SimConfig.dispatch_time``), and each finish reaching the router when the
front end saw it (``SimConfig.report_time``), in the order the replica took
them. A plan ends when the
replica's next plan started if some request ran on across the two (the
step loop went straight on), else after its measured duration (it went
idle). ``replay_cluster`` returns where the twin routed each request and the
plans each replica ran, to compare with the recording.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tokenmill.core.request import Request
from tokenmill.core.scheduler import SchedulerConfig
from tokenmill.executor.sim_executor import SimExecutor
from tokenmill.sim.config import PoolConfig, SimConfig
from tokenmill.sim.cost_model import ReplayCostModel
from tokenmill.sim.simulator import Simulator
from tokenmill.sim.workload import RequestSpec, Workload

# Requests reach their replica this long before the plan they joined starts (the twin's
# plan ends this long before the next begins): far below any measured time, and it keeps
# each event on the right side of the plan boundary.
_EPS = 1e-6


@dataclass
class ReplicaLog:
    """One replica's plans: (requests added before it, summary, duration, start), in order."""

    plans: list[tuple[list[str], tuple, float, float]] = field(default_factory=list)


@dataclass
class ClusterRecording:
    scheduler: SchedulerConfig
    router: str
    router_options: dict[str, Any]
    requests: dict[str, tuple[list[int], int]]  # id -> (prompt, output length)
    routed: dict[str, tuple[int, float]]  # id -> (replica, front-end time)
    finished: dict[str, float]  # id -> front-end time it saw the finish
    replicas: list[ReplicaLog]


def _plan_ends(log: ReplicaLog) -> tuple[list[float], list[float]]:
    """Twin start and end of each plan (see the module docstring)."""
    plans = log.plans
    last: dict[str, int] = {}
    first: dict[str, int] = {}
    for j, (added, summary, _, _) in enumerate(plans):
        for rid in added:
            first.setdefault(rid, j)
        for rid, *_ in summary[1]:
            last[rid] = j
            first.setdefault(rid, j)
        for rid in summary[2]:
            last[rid] = j
    # live[j]: some request ran before or in plan j and again after it
    crossing = [0] * (len(plans) + 1)
    for rid, j1 in last.items():
        j0 = first[rid]
        if j1 > j0:
            crossing[j0] += 1
            crossing[j1] -= 1
    starts, ends = [], []
    live = 0
    busy_before = False
    for j, (_, _, duration, start) in enumerate(plans):
        live += crossing[j]
        # Busy: the previous plan ended just before; idle: woken (idle_wake_delay) by requests
        # that reached the replica in [start - 3 eps, start - 2 eps).
        starts.append(start - (_EPS if busy_before else 2 * _EPS))
        busy_after = live > 0 and j + 1 < len(plans)
        ends.append(plans[j + 1][3] - _EPS if busy_after else start + duration)
        busy_before = busy_after
    return starts, ends


def replay_cluster(rec: ClusterRecording) -> tuple[dict[str, int], list[list[tuple]]]:
    """Run the twin on the recording; returns (request id -> replica it was routed to, each
    replica's plan summaries with the recording's request ids)."""
    order = sorted(rec.routed, key=lambda rid: rec.routed[rid][1])
    t0 = rec.routed[order[0]][1] - 1.0  # keep every time positive
    index = {rid: i for i, rid in enumerate(order)}
    specs = []
    for rid in order:
        prompt, out = rec.requests[rid]
        specs.append(RequestSpec(rec.routed[rid][1] - t0, len(prompt), out, prompt_tokens=list(prompt)))
    workload = Workload(specs, vocab_size=1 << 30, description={"kind": "cluster replay"})
    # When each request reached its replica: just before the plan it joined.
    joined: dict[str, float] = {}
    costs = []
    for log in rec.replicas:
        starts, ends = _plan_ends(log)
        for added, _, _, start in log.plans:
            # In the order the replica took them (it stamps arrivals on taking them; Ray may
            # start an async actor's calls out of the order they were sent in).
            for k, rid in enumerate(added):
                if rid in index:
                    joined[str(index[rid])] = start - 3 * _EPS + k * _EPS / len(added) - t0
        costs.append(ReplayCostModel([e - s for s, e in zip(starts, ends, strict=True)], per_plan=True))
    seen = {str(index[rid]): t - t0 for rid, t in rec.finished.items() if rid in index}
    n = len(rec.replicas)
    pool = PoolConfig(dataclasses.replace(rec.scheduler), costs[0], n, rec.router, dict(rec.router_options))
    config = SimConfig(pool, mode="engine", record_plans=True, idle_wake_delay=_EPS,
                       dispatch_time=lambda rid, t: max(t, joined.get(rid, t)),
                       report_time=lambda rid, t: max(t, seen.get(rid, t)))  # fmt: skip
    sim = Simulator(workload, config)
    for rep, cm in zip(sim.replicas, costs, strict=True):
        rep.cm = cm
        rep.executor = SimExecutor(cm, config.token_id)
    routed: dict[str, int] = {}
    orig = sim.router.route

    def route(req: Request) -> int:
        r = orig(req)
        routed[order[int(req.request_id)]] = r
        return r

    sim.router.route = route  # type: ignore[method-assign]
    sim.run()
    plans: list[list[tuple]] = [[] for _ in range(n)]
    for replica, (k, seqs, preempted) in sim.plan_log:
        names = tuple((order[int(rid)], *rest) for rid, *rest in seqs)
        plans[replica].append((k, names, tuple(order[int(r)] for r in preempted)))
    return routed, plans
