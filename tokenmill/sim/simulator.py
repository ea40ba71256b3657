"""The event-driven twin: the core's schedulers and router in virtual time.

Each replica is a real ``tokenmill.core.scheduler.Scheduler`` with a
``SimExecutor``; a cluster puts ``core.router`` in front of them. Time jumps
from event to event (a heap of plan ends and KV-transfer completions, merged
with the sorted arrivals); nothing happens in between.

Multi-step plans and arrivals. The scheduler may plan many decode steps at
once when nothing can change; the simulator uses this to skip over long runs
of decodes. Two modes decide how arrivals cut such runs:

- ``ideal`` (default): the twin of an engine that admits a new request at the
  next step boundary. When the replica's next arrival is known in advance
  (one replica, or round-robin routing), the plan is capped with
  ``max_steps`` so that it ends at the first sub-step boundary at or after
  the arrival. When the router decides at arrival time, an arrival that lands
  inside a plan cuts it there (``Scheduler.shorten_plan``). Tokens are
  timestamped at their own sub-step's end.
- ``engine``: the twin of an engine configured with ``max_decode_steps``,
  which runs each plan to its end whatever arrives meanwhile and delivers its
  tokens when the plan returns.

Prefill/decode disaggregation (DistServe, Splitwise), with the core's KV
import and export as the real cluster uses them: a prefill pool runs each
prompt with ``max_tokens=1`` and holds its KV when it finishes; the decode
pool's router picks a decode replica, which reserves blocks for the prompt's
KV (``Scheduler.reserve_import``: full blocks its prefix cache already holds
are not transferred, as in Mooncake); the rest travels for ``latency +
blocks * block_size * kv_bytes_per_token / bandwidth`` seconds; then the
prefill replica releases its blocks and the request joins the decode
replica's queue with its first token appended and its whole prompt's KV in
place, so the decode replica computes no prompt token. When the decode
replica has no room to reserve, nothing is transferred and it recomputes the
prompt. Link contention is not modelled.

The front end of a real cluster sees things late: a request reaches its
replica a moment after the router picked it, and the router hears of a finish
a moment after the replica's step. By default the twin has no such delays;
``SimConfig.dispatch_time`` and ``report_time`` give them (a replay of a
measured cluster run uses them, ``cluster_replay.py``).
"""

from __future__ import annotations

import dataclasses
import gc
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Any

from tokenmill.core.lora import LoRARequest, cache_namespace
from tokenmill.core.plan import SeqUpdate, StepPlan, StepResult
from tokenmill.core.request import Request, SamplingParams
from tokenmill.core.router import RoundRobinRouter, Router, make_router
from tokenmill.core.scheduler import QueueFullError, Scheduler
from tokenmill.core.timeline import Timeline
from tokenmill.executor.sim_executor import SimExecutor
from tokenmill.sim.config import PoolConfig, SimConfig, SimResult, pool_description
from tokenmill.sim.cost_model import CostModel, steps_until
from tokenmill.sim.metrics import LogHistogram, RequestRecords, merge_series, summarize
from tokenmill.sim.workload import RequestSpec, Workload

_NAN = float("nan")
_INF = float("inf")
_REPLICA, _TRANSFER, _DISPATCH, _REPORT = 0, 1, 2, 3


class _Track:
    """A request's progress, for its metrics."""

    __slots__ = ("index", "spec", "first", "last", "n_out", "preemptions", "cached")

    def __init__(self, index: int, spec: RequestSpec) -> None:
        self.index = index
        self.spec = spec
        self.first = -1.0
        self.last = 0.0
        self.n_out = 0
        self.preemptions = 0
        self.cached = 0


class Replica:
    __slots__ = ("index", "role", "sched", "executor", "cm", "plan", "result", "t0", "end", "version",
                 "active", "known", "arr_pos", "next_sample", "series", "busy_time", "num_plans",
                 "num_steps", "num_cuts", "gpus", "_kmax", "prefill_tokens", "stateful_cm")  # fmt: skip

    def __init__(self, index: int, role: str, pool: PoolConfig, token_id: int) -> None:
        self.index = index
        self.role = role
        # Lean plans: the twin's executor prices a plan from its positions alone.
        self.sched = Scheduler(dataclasses.replace(pool.scheduler, policy_options=dict(pool.scheduler.policy_options)),
                               lean_plans=True)  # fmt: skip
        self.cm = pool.cost_model
        self.executor = SimExecutor(pool.cost_model, token_id, acceptance=pool.spec_acceptance, seed=index)
        self.plan: StepPlan | None = None
        self.result: StepResult | None = None
        self.t0 = 0.0
        self.end = 0.0
        self.version = 0
        self.active = False
        self.known: list[float] | None = None  # this replica's arrival times, when known in advance
        self.arr_pos = 0
        self.next_sample = 0.0
        self.series: list[tuple[float, float, int, int]] = []  # (t, kv usage, waiting, running)
        self.busy_time = 0.0
        self.num_plans = 0
        self.num_steps = 0
        self.num_cuts = 0
        self.prefill_tokens = 0  # prompt (or recomputed) tokens computed
        self.gpus = pool.gpus_per_replica
        cfg = self.sched.config
        self._kmax = cfg.max_decode_steps
        # Only stateful cost models (a replay) need to hear of each finished plan.
        self.stateful_cm = type(self.cm).on_plan_done is not CostModel.on_plan_done


class Simulator:
    def __init__(self, workload: Workload, config: SimConfig, progress: Callable[[int, int], None] | None = None) -> None:
        self.workload = workload
        self.config = config
        self.ideal = config.mode == "ideal"
        self.disagg = config.prefill_pool is not None
        dpool = config.pool
        self.replicas = [Replica(i, "decode" if self.disagg else "both", dpool, config.token_id)
                         for i in range(dpool.num_replicas)]  # fmt: skip
        self.router = make_router(dpool.router, dpool.num_replicas, **dpool.router_options)
        self.prefill: list[Replica] = []
        self.prefill_router: Router | None = None
        if config.prefill_pool is not None:
            pp = config.prefill_pool
            base = len(self.replicas)
            self.prefill = [Replica(base + i, "prefill", pp, config.token_id) for i in range(pp.num_replicas)]
            self.prefill_router = make_router(pp.router, pp.num_replicas, **pp.router_options)
            for r in self.replicas:
                if r.sched.kv.cache is None:
                    raise ValueError("disaggregated decode replicas need prefix caching: transferred KV lands in it")
        if config.timeline_requests:
            self._attach_timelines(config.timeline_requests)
        self.entry = self.prefill if self.disagg else self.replicas
        self.entry_router = self.prefill_router if self.prefill_router is not None else self.router
        self.heap: list[tuple[float, int, int, Any, int]] = []
        self._seq = itertools.count()
        self.tracks: dict[str, _Track] = {}
        self.records = RequestRecords()
        self.itl = LogHistogram()
        self.num_rejected = 0
        self.num_import_failures = 0
        self.num_transfers = 0
        self.num_transfer_blocks = 0
        self.progress = progress
        self.plan_log: list[tuple[int, tuple]] = []
        self._record = config.record_plans
        self._params: dict[int, SamplingParams] = {}
        self._loras: dict[str, LoRARequest] = {}  # a workload's adapter names, ids in order of first use
        self._prefill_params = SamplingParams(max_tokens=1, ignore_eos=True)
        horizon = max(workload.duration, 1e-3)
        self.sample_interval = horizon / max(config.num_samples, 1)
        self.bin_width = horizon / 200
        self.token_bins: dict[int, float] = {}
        self._plan_known_arrivals()

    def _attach_timelines(self, max_requests: int) -> None:
        everyone = self.replicas + self.prefill
        for r in everyone:
            role = "" if r.role == "both" else f"{r.role} "
            label = "twin" if len(everyone) == 1 else f"twin {role}replica {r.index}"
            r.sched.timeline = Timeline(label, pid=r.index, max_requests=max_requests)

    def _plan_known_arrivals(self) -> None:
        # Routing that depends only on arrival order can be done ahead, which lets
        # each replica cap its plans at its own next arrival instead of being cut.
        if not self.ideal:
            return
        pool, router = self.entry, self.entry_router
        if isinstance(router, RoundRobinRouter) or len(pool) == 1:
            n = len(pool)
            times = [s.arrival for s in self.workload.requests]
            for r, rep in enumerate(pool):
                rep.known = times[r::n]

    # ------------------------------------------------------------------ run

    def run(self) -> SimResult:
        # A long run holds millions of small objects (requests, radix-tree nodes,
        # block keys) that the cyclic collector would rescan over and over, for a
        # third of the run time; the simulator's objects are freed by reference
        # counting, so the collector is paused for the run and restored after.
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            if enabled:
                gc.enable()

    def _run(self) -> SimResult:
        wall0 = time.perf_counter()
        specs = self.workload.requests
        n = len(specs)
        heap = self.heap
        pop = heapq.heappop
        on_replica = self._on_replica
        i = 0
        next_arr = specs[0].arrival if n else _INF
        while True:
            if heap and heap[0][0] < next_arr:
                t, _, kind, obj, version = pop(heap)
                if kind == _REPLICA:
                    if version == obj.version:
                        on_replica(obj, t)
                elif kind == _TRANSFER:
                    self._on_transfer(t, *obj)
                elif kind == _DISPATCH:
                    self._dispatched(t, *obj)
                else:
                    obj[0].on_finished(obj[1])
                continue
            if i >= n:
                break
            self._arrive(i, specs[i], next_arr)
            i += 1
            next_arr = specs[i].arrival if i < n else _INF
        return self._result(time.perf_counter() - wall0)

    # -------------------------------------------------------------- arrivals

    def _params_for(self, output_len: int) -> SamplingParams:
        p = self._params.get(output_len)
        if p is None:
            p = self._params[output_len] = SamplingParams(max_tokens=output_len, ignore_eos=True)
        return p

    def _lora(self, name: str) -> LoRARequest | None:
        if not name:
            return None
        lora = self._loras.get(name)
        if lora is None:
            lora = self._loras[name] = LoRARequest(name, len(self._loras) + 1, "")
        return lora

    def _arrive(self, index: int, spec: RequestSpec, t: float) -> None:
        rid = str(index)
        params = self._prefill_params if self.disagg else self._params_for(spec.output_len)
        lora = self._lora(spec.lora)
        req = Request(rid, self.workload.prompt_tokens(index, spec), params, arrival_time=t,
                      client_id=spec.client, cache_namespace=cache_namespace(spec.namespace, lora),
                      ttft_slo=spec.ttft_slo, tpot_slo=spec.tpot_slo, predicted_output_len=spec.output_len,
                      hold_kv=self.disagg, lora=lora)  # fmt: skip
        router = self.entry_router
        assert router is not None
        rep = self.entry[router.route(req)]
        rep.arr_pos += 1
        hook = self.config.dispatch_time
        if hook is not None:
            t_d = hook(rid, t)
            if t_d > t:
                heapq.heappush(self.heap, (t_d, next(self._seq), _DISPATCH, (rep, req, index, spec), 0))
                return
        self._dispatched(t, rep, req, index, spec)

    def _dispatched(self, t: float, rep: Replica, req: Request, index: int, spec: RequestSpec) -> None:
        """The routed request reaches its replica, which stamps its arrival (its queue's order)."""
        req.arrival_time = t
        try:
            rep.sched.add_request(req, t)
        except (ValueError, QueueFullError):
            self._report(self.entry_router, req, t)  # type: ignore[arg-type]
            self.num_rejected += 1
            return
        self.tracks[req.request_id] = _Track(index, spec)
        self._wake(rep, t)

    def _report(self, router: Router, req: Request, t: float) -> None:
        """The router hears that ``req`` finished (at once, or when ``report_time`` says)."""
        hook = self.config.report_time
        if hook is not None:
            t_r = hook(req.request_id, t)
            if t_r > t:
                heapq.heappush(self.heap, (t_r, next(self._seq), _REPORT, (router, req), 0))
                return
        router.on_finished(req)

    def _wake(self, rep: Replica, t: float) -> None:
        """A request reached ``rep`` at ``t``: start it if idle, or cut its plan at the next boundary."""
        if not rep.active:
            rep.active = True
            heapq.heappush(self.heap, (t + self.config.idle_wake_delay, next(self._seq), _REPLICA, rep, rep.version))
            return
        plan = rep.plan
        if plan is None or plan.num_steps == 1 or not self.ideal or rep.end <= t or rep.known is not None:
            return
        n = len(plan.seqs)
        ctx = n
        for s in plan.seqs:
            ctx += s.start_pos
        k = steps_until(rep.cm, n, ctx, t - rep.t0, plan.num_steps)
        if k < plan.num_steps:
            self._cut(rep, plan, k)

    def _cut(self, rep: Replica, plan: StepPlan, k: int) -> None:
        rep.sched.shorten_plan(plan, k)
        result = rep.executor.execute(plan)
        rep.result = result
        rep.end = rep.t0 + (result.duration or 0.0)
        rep.version += 1
        rep.num_cuts += 1
        heapq.heappush(self.heap, (rep.end, next(self._seq), _REPLICA, rep, rep.version))

    # ---------------------------------------------------------------- plans

    def _on_replica(self, rep: Replica, t: float) -> None:
        plan = rep.plan
        if plan is not None:
            result = rep.result
            assert result is not None
            if self._record:
                self.plan_log.append((rep.index, plan.summary()))
            updates = rep.sched.update(plan, result)
            if rep.stateful_cm:
                rep.cm.on_plan_done(plan)
            self._account(rep, plan, result.duration or 0.0, updates)
            rep.plan = None
        self._start(rep, t)

    def _start(self, rep: Replica, t: float) -> None:
        sched = rep.sched
        if not sched.requests:
            rep.active = False
            rep.series.append((t, sched.kv.usage, 0, 0))  # going idle: the series must not carry a busy sample
            return
        if t >= rep.next_sample:
            rep.series.append((t, sched.kv.usage, len(sched.waiting), len(sched.running)))
            rep.next_sample = t + self.sample_interval
        cap = None
        m = 0
        known = rep.known
        if known is not None and rep.arr_pos < len(known):
            cap, m = self._cap(rep, t, known[rep.arr_pos])
        plan = sched.schedule(t, cap)
        if plan.is_empty:
            rep.active = False  # nothing can run until something arrives
            return
        if plan.num_steps > 1 and cap is not None and len(plan.seqs) != m:
            # Someone was admitted into a multi-step plan, so the cap was priced on the
            # wrong batch: re-check it on the real one.
            ctx = len(plan.seqs) + sum(s.start_pos for s in plan.seqs)
            k = steps_until(rep.cm, len(plan.seqs), ctx, known[rep.arr_pos] - t, plan.num_steps)  # type: ignore[index]
            if k < plan.num_steps:
                sched.shorten_plan(plan, k)
        result = rep.executor.execute(plan)
        rep.plan = plan
        rep.result = result
        rep.t0 = t
        rep.end = end = t + (result.duration or 0.0)
        heapq.heappush(self.heap, (end, next(self._seq), _REPLICA, rep, rep.version))

    def _cap(self, rep: Replica, t: float, t_next: float) -> tuple[int, int]:
        """``max_steps`` so that a decode run ends at the first boundary at or after ``t_next``.

        The scheduler says what decode run the next plan would be
        (``Scheduler.decode_run``); it is priced before scheduling. Returns
        (cap, batch size priced).
        """
        run = rep.sched.decode_run()
        if run is None:
            return 1, 0
        m, ctx = run
        return steps_until(rep.cm, m, ctx, t_next - t, rep._kmax), m

    def _account(self, rep: Replica, plan: StepPlan, dur: float, updates: list[SeqUpdate]) -> None:
        """Token timestamps, ITL, finishes for a completed plan."""
        k = plan.num_steps
        t0 = rep.t0
        end = t0 + dur
        rep.busy_time += dur
        rep.num_plans += 1
        rep.num_steps += k
        if k == 1:  # a multi-step plan holds one-token decodes only
            for s in plan.seqs:
                if s.num_new_tokens > 1 or not s.samples:  # ScheduledSeq.is_prefill, inlined
                    rep.prefill_tokens += s.num_new_tokens
        ideal = self.ideal
        sub = dur / k if ideal else 0.0
        tol = 1e-12 * (1.0 + sub)
        t_sub1 = t0 + sub if ideal else end  # the first sub-step's end
        tracks = self.tracks
        itl = self.itl
        same = 0  # gaps equal to one sub-step, added to the histogram in one go
        n_tokens = 0
        for u in updates:
            n_new = len(u.new_token_ids)
            if not n_new:
                continue
            n_tokens += n_new
            req = u.request
            tr = tracks[req.request_id]
            spec_extra = n_new - k if n_new > k else 0  # accepted drafts: they come with their step's token
            if ideal and not spec_extra:
                t_first = t_sub1
                t_last = t0 + sub * n_new if n_new > 1 else t_first
            else:
                t_first = t_last = end
            if tr.first < 0:
                tr.first = t_first
                tr.cached = max(req.num_cached_tokens, 0)
            else:
                gap = t_first - tr.last
                if abs(gap - sub) <= tol:
                    same += 1
                else:
                    itl.add(gap)
            if spec_extra:
                itl.add(0.0, n_new - 1)
            else:
                same += n_new - 1
            tr.last = t_last
            tr.n_out += n_new
            if u.finished:
                tr.preemptions += req.num_preemptions
                self._finished(rep, tr, req, t_last)
        if same:
            itl.add(sub, same)
        if n_tokens:
            bins = self.token_bins
            w = self.bin_width
            b0, b1 = int(t0 / w), int(end / w)
            if b0 == b1 or not ideal:
                bins[b1] = bins.get(b1, 0) + n_tokens
            else:  # a long decode run: spread its tokens over the bins it spans
                for b in range(b0, b1 + 1):
                    share = (min(end, (b + 1) * w) - max(t0, b * w)) / dur
                    bins[b] = bins.get(b, 0) + n_tokens * share

    def _finished(self, rep: Replica, tr: _Track, req: Request, t: float) -> None:
        rid = req.request_id
        if rep.role == "prefill":
            assert self.prefill_router is not None
            self._report(self.prefill_router, req, t)
            if tr.spec.output_len > 1:
                self._start_transfer(tr, req, t, rep)
                return
            rep.sched.release_kv(rid)  # the request ends here: nothing to transfer
        else:
            self._report(self.router, req, t)
        del self.tracks[rid]
        spec = tr.spec
        rec = self.records
        rec.index.append(tr.index)
        rec.arrival.append(spec.arrival)
        rec.first_token.append(tr.first)
        rec.finish.append(t)
        rec.prompt_len.append(spec.prompt_len)
        rec.output_len.append(tr.n_out)
        rec.ttft_slo.append(_NAN if spec.ttft_slo is None else spec.ttft_slo)
        rec.tpot_slo.append(_NAN if spec.tpot_slo is None else spec.tpot_slo)
        rec.client.append(spec.client)
        rec.slo_class.append(spec.slo_class)
        rec.preemptions.append(tr.preemptions)
        rec.cached_tokens.append(tr.cached)
        if self.progress is not None:
            self.progress(len(rec), self.num_rejected)

    # ------------------------------------------------------ disaggregation

    def _start_transfer(self, tr: _Track, req: Request, t: float, src: Replica) -> None:
        spec = tr.spec
        tokens = req.prompt_token_ids + req.output_token_ids
        dreq = Request(req.request_id, tokens, self._params_for(spec.output_len - 1), arrival_time=t,
                       client_id=spec.client, cache_namespace=req.cache_namespace, ttft_slo=spec.ttft_slo,
                       tpot_slo=spec.tpot_slo, predicted_output_len=spec.output_len - 1, lora=req.lora)  # fmt: skip
        dst = self.replicas[self.router.route(dreq)]
        cfg = self.config
        got = dst.sched.reserve_import(dreq, req.num_prompt_tokens)
        if got is None:
            self.num_import_failures += 1  # no room: nothing moves, the decode replica recomputes
            delay = 0.0
        else:
            blocks = len(got[1])
            self.num_transfers += 1
            self.num_transfer_blocks += blocks
            nbytes = blocks * dst.sched.kv.block_size * cfg.kv_bytes_per_token
            delay = cfg.kv_transfer_latency + nbytes / cfg.kv_transfer_bandwidth
        heapq.heappush(self.heap, (t + delay, next(self._seq), _TRANSFER, (tr, dreq, dst, src), 0))

    def _on_transfer(self, t: float, tr: _Track, req: Request, rep: Replica, src: Replica) -> None:
        src.sched.release_kv(req.request_id)
        if not src.active and src.sched.requests:
            self._wake(src, t)  # idle for want of the blocks it held: its queue can go on
        req.arrival_time = t
        try:
            rep.sched.add_request(req, t)
        except (ValueError, QueueFullError):
            rep.sched.cancel_import(req.request_id)
            self.router.on_finished(req)
            self.num_rejected += 1
            del self.tracks[req.request_id]
            return
        self._wake(rep, t)

    # --------------------------------------------------------------- result

    def _result(self, wall: float) -> SimResult:
        cfg = self.config
        summary = summarize(self.records, self.itl, cfg.ttft_slo, cfg.tpot_slo, self.num_rejected)
        everyone = self.replicas + self.prefill
        gpus = sum(r.gpus for r in everyone)
        duration = summary.get("duration_s") or 0.0
        summary["num_gpus"] = gpus
        summary["goodput_per_gpu"] = summary.get("goodput", 0.0) / gpus if gpus else 0.0
        summary["unfinished"] = len(self.tracks)
        if self.disagg:
            summary["kv_transfers"] = self.num_transfers
            summary["kv_transfer_blocks"] = self.num_transfer_blocks
            summary["kv_import_failures"] = self.num_import_failures
        reps = []
        for r in everyone:
            st = r.sched.stats()
            reps.append({
                "index": r.index, "role": r.role, "plans": r.num_plans, "steps": r.num_steps,
                "cut_plans": r.num_cuts, "prefill_tokens": r.prefill_tokens, "busy_fraction": r.busy_time / duration if duration else 0.0,
                "preemptions": st.num_preemptions, "num_blocks": st.num_blocks,
                "prefix_hit_rate": st.prefix_hit_tokens / st.prefix_query_tokens if st.prefix_query_tokens else 0.0,
                "evicted_blocks": st.num_evicted_blocks,
            })  # fmt: skip
        series = merge_series([r.series for r in everyone], self.sample_interval)
        width = self.bin_width
        tb = sorted(self.token_bins.items())
        throughput = {"t": [b * width for b, _ in tb], "output_tokens_per_s": [c / width for _, c in tb]}
        num_plans = sum(r.num_plans for r in everyone)
        num_steps = sum(r.num_steps for r in everyone)
        config = {
            "mode": cfg.mode,
            "pool": pool_description(cfg.pool),
            "prefill_pool": pool_description(cfg.prefill_pool) if cfg.prefill_pool else None,
            "kv_transfer_bandwidth": cfg.kv_transfer_bandwidth if self.disagg else None,
            "workload": self.workload.summary(),
        }
        timelines = [r.sched.timeline for r in everyone if r.sched.timeline is not None]
        return SimResult(summary, self.records, self.itl, reps, series, throughput, wall, num_plans, num_steps, config,
                         timelines)  # fmt: skip


def simulate(workload: Workload, config: SimConfig, progress: Callable[[int, int], None] | None = None) -> SimResult:
    return Simulator(workload, config, progress).run()

