"""Request timelines recorded by the scheduler, exported as Chrome trace events.

A ``Timeline`` attached to a ``Scheduler`` (``scheduler.timeline``) is told
about every arrival (``add_request``), every plan as ``update`` takes it back
(with the plan's start ``plan.now`` and its ``result.duration``), and every
finish (``_finish``). The real engine and the twin drive the same scheduler,
so both write their timelines through this one class: the engine's times are
its clock's, the twin's are virtual.

Per request it keeps: arrival; time queued (from arrival, or from a
preemption, until a plan next schedules it); each prefill chunk (tokens
``[start, start + n)``); each decode plan (``steps`` sub-steps);
preemptions; first token; finish (reason, tokens). Per plan: one span on a
"plans" track with its batch shape.

``chrome_trace`` turns timelines into the Trace Event Format (the JSON object
form: ``{"traceEvents": [...]}``) that Perfetto and ``chrome://tracing`` open:
one process per timeline (engine, or one per twin replica), one thread per
request (``tid`` in arrival order, 0 for the plans track), complete events
(``ph: "X"``) for spans and thread-scoped instants (``ph: "i"``), timestamps in
microseconds from ``origin`` (default: the earliest arrival of all).

Pure Python, no I/O: writing the JSON is the caller's business.
"""

from __future__ import annotations

from typing import Any

# Event kinds (kept as small tuples while recording; dicts only on export).
QUEUED, PREFILL, DECODE, PREEMPTED = "queued", "prefill", "decode", "preempted"


class _Track:
    __slots__ = ("tid", "arrival", "waiting_since", "events", "first_token", "finish", "reason", "num_output",
                 "sampled")  # fmt: skip

    def __init__(self, tid: int, arrival: float) -> None:
        self.tid = tid
        self.arrival = arrival
        self.waiting_since: float | None = arrival
        self.events: list[tuple[str, float, float, int, int]] = []  # (kind, t0, t1, a, b)
        self.first_token: float | None = None
        self.finish: float | None = None
        self.reason = ""
        self.num_output = 0
        self.sampled = False  # a plan has sampled a token for it (so a one-token step may be a decode)


class Timeline:
    """What happened to each request of one scheduler, and when (see the module docstring)."""

    def __init__(self, label: str = "engine", pid: int = 0, max_requests: int | None = None) -> None:
        self.label = label
        self.pid = pid
        self.max_requests = max_requests  # requests past this many are not recorded (bounded memory)
        self.tracks: dict[str, _Track] = {}
        self.plans: list[tuple[float, float, int, int, int, int]] = []  # (t0, t1, seqs, prefill tokens, decodes, steps)

    # ------------------------------------------------------------ recording

    def arrival(self, request_id: str, now: float) -> None:
        if self.max_requests is not None and len(self.tracks) >= self.max_requests:
            return
        self.tracks[request_id] = _Track(len(self.tracks) + 1, now)

    def plan(self, plan: Any, duration: float) -> None:
        """A plan came back from the executor: ``plan.now`` to ``plan.now + duration``."""
        t0 = plan.now
        t1 = t0 + duration
        tracks = self.tracks
        for rid in plan.preempted_ids:
            tr = tracks.get(rid)
            if tr is not None:
                tr.events.append((PREEMPTED, t0, t0, 0, 0))
                tr.waiting_since = t0
        k = plan.num_steps
        prefill = decodes = 0
        seen = False
        for s in plan.seqs:
            tr = tracks.get(s.request_id)
            # A prompt's last chunk may be one token that samples: a decode only once a token exists.
            is_prefill = s.num_new_tokens > 1 or not s.samples or (tr is not None and not tr.sampled)
            if is_prefill:
                prefill += s.num_new_tokens
            else:
                decodes += 1
            if tr is None:
                continue
            seen = True
            if s.samples:
                tr.sampled = True
            if tr.waiting_since is not None:
                tr.events.append((QUEUED, tr.waiting_since, t0, 0, 0))
                tr.waiting_since = None
            if not is_prefill:
                tr.events.append((DECODE, t0, t1, s.start_pos, k))
            elif k == 1:
                tr.events.append((PREFILL, t0, t1, s.start_pos, s.num_new_tokens))
            else:  # a prompt's last token opening a multi-step plan: its first sub-step, then decodes
                t_sub = t0 + (t1 - t0) / k
                tr.events.append((PREFILL, t0, t_sub, s.start_pos, s.num_new_tokens))
                tr.events.append((DECODE, t_sub, t1, s.start_pos + 1, k - 1))
        if seen:
            self.plans.append((t0, t1, len(plan.seqs), prefill, decodes, k))

    def finished(self, request_id: str, now: float, first_token: float | None, reason: str, num_output: int) -> None:
        tr = self.tracks.get(request_id)
        if tr is None:
            return
        if tr.waiting_since is not None and tr.waiting_since < now:
            tr.events.append((QUEUED, tr.waiting_since, now, 0, 0))  # aborted while waiting
        tr.waiting_since = None
        tr.first_token = first_token
        tr.finish = now
        tr.reason = reason
        tr.num_output = num_output

    # -------------------------------------------------------------- export

    def earliest(self) -> float | None:
        return min((tr.arrival for tr in self.tracks.values()), default=None)

    def trace_events(self, origin: float = 0.0) -> list[dict[str, Any]]:
        """This timeline's events in the Trace Event Format, times in microseconds from ``origin``."""
        pid = self.pid

        def us(t: float) -> float:
            return round((t - origin) * 1e6, 3)

        ev: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": self.label}},
            {"name": "thread_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": "plans"}},
            {"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": 0}},
        ]
        for t0, t1, n, p, d, k in self.plans:
            ev.append({"name": "plan", "cat": "plan", "ph": "X", "pid": pid, "tid": 0, "ts": us(t0),
                       "dur": us(t1) - us(t0), "args": {"seqs": n, "prefill_tokens": p, "decodes": d, "steps": k}})  # fmt: skip
        for rid, tr in self.tracks.items():
            tid = tr.tid
            ev.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": f"request {rid}"}})
            ev.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
            end = tr.finish if tr.finish is not None else max([tr.arrival] + [e[2] for e in tr.events])
            ev.append({"name": f"request {rid}", "cat": "request", "ph": "X", "pid": pid, "tid": tid,
                       "ts": us(tr.arrival), "dur": us(end) - us(tr.arrival),
                       "args": {"request_id": rid, "finish_reason": tr.reason or None,
                                "output_tokens": tr.num_output}})  # fmt: skip
            ev.append({"name": "arrival", "cat": "request", "ph": "i", "s": "t", "pid": pid, "tid": tid,
                       "ts": us(tr.arrival), "args": {"request_id": rid}})  # fmt: skip
            for kind, t0, t1, a, b in tr.events:
                if kind == PREEMPTED:
                    ev.append({"name": kind, "cat": "request", "ph": "i", "s": "t", "pid": pid, "tid": tid,
                               "ts": us(t0), "args": {"request_id": rid}})  # fmt: skip
                    continue
                args: dict[str, Any] = {"request_id": rid}
                if kind == PREFILL:
                    args.update(start=a, tokens=b)
                elif kind == DECODE:
                    args.update(start=a, steps=b)
                ev.append({"name": kind, "cat": "request", "ph": "X", "pid": pid, "tid": tid, "ts": us(t0),
                           "dur": us(t1) - us(t0), "args": args})  # fmt: skip
            if tr.first_token is not None:
                ev.append({"name": "first_token", "cat": "request", "ph": "i", "s": "t", "pid": pid, "tid": tid,
                           "ts": us(tr.first_token), "args": {"request_id": rid}})  # fmt: skip
            if tr.finish is not None:
                ev.append({"name": "finish", "cat": "request", "ph": "i", "s": "t", "pid": pid, "tid": tid,
                           "ts": us(tr.finish), "args": {"request_id": rid, "reason": tr.reason,
                                                          "output_tokens": tr.num_output}})  # fmt: skip
        return ev


def chrome_trace(timelines: list[Timeline], origin: float | None = None,
                 metadata: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Timelines as one Trace Event Format object; ``origin`` defaults to the earliest arrival."""
    if origin is None:
        firsts = [t for t in (tl.earliest() for tl in timelines) if t is not None]
        origin = min(firsts, default=0.0)
    events: list[dict[str, Any]] = []
    for tl in timelines:
        events.extend(tl.trace_events(origin))
    out: dict[str, Any] = {"traceEvents": events, "displayTimeUnit": "ms"}
    if metadata:
        out["otherData"] = {str(k): str(v) for k, v in metadata.items()}
    return out
