"""Request timeline files: write the scheduler's timelines as Chrome trace JSON, read them back.

``write_trace`` writes what ``core.timeline.chrome_trace`` builds (the Trace
Event Format that Perfetto and ``chrome://tracing`` open). ``read_trace``
turns such a file back into one ``RequestTimeline`` per request, which is
what ``sim compare`` works on; it reads files from the engine
(``serve/generate --trace-file``, ``sim validate --trace-dir``) and from the
twin (``sim run --trace-file``) alike, since both come from the same class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.core.timeline import Timeline, chrome_trace


def write_trace(path: str | Path, timelines: list[Timeline], metadata: dict[str, Any] | None = None,
                origin: float | None = None) -> int:  # fmt: skip
    """Write the timelines to ``path``; returns the number of events."""
    trace = chrome_trace([t for t in timelines if t is not None], origin, metadata)
    Path(path).write_text(json.dumps(trace, separators=(",", ":")))
    return len(trace["traceEvents"])


@dataclass
class RequestTimeline:
    """One request's events, times in seconds from the trace's origin."""

    request_id: str
    process: str = ""
    arrival: float = float("nan")
    first_token: float = float("nan")
    finish: float = float("nan")
    reason: str = ""
    output_tokens: int = 0
    queued: list[tuple[float, float]] = field(default_factory=list)
    prefill: list[tuple[float, float, int, int]] = field(default_factory=list)  # (t0, t1, start, tokens)
    decode: list[tuple[float, float, int]] = field(default_factory=list)  # (t0, t1, steps)
    preempted: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def chunks(self) -> list[tuple[int, int]]:
        """The prefill chunks as (start, tokens): the decisions, without their times."""
        return [(s, n) for _, _, s, n in self.prefill]


def read_trace(path: str | Path) -> dict[str, RequestTimeline]:
    """Request id -> timeline, from a trace file written by ``write_trace``."""
    data = json.loads(Path(path).read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    names: dict[int, str] = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            names[e["pid"]] = e["args"]["name"]
    out: dict[str, RequestTimeline] = {}
    for e in events:
        if e.get("cat") != "request":
            continue
        args = e.get("args", {})
        rid = str(args["request_id"])
        rt = out.get(rid)
        if rt is None:
            rt = out[rid] = RequestTimeline(rid, names.get(e["pid"], str(e["pid"])))
        t = e["ts"] / 1e6
        end = t + e.get("dur", 0.0) / 1e6
        name = e["name"]
        if name == "arrival":
            rt.arrival = t
        elif name == "first_token":
            rt.first_token = t
        elif name == "finish":
            rt.finish = t
            rt.reason = args.get("reason", "")
            rt.output_tokens = int(args.get("output_tokens", 0))
        elif name == "queued":
            rt.queued.append((t, end))
        elif name == "prefill":
            rt.prefill.append((t, end, int(args["start"]), int(args["tokens"])))
        elif name == "decode":
            rt.decode.append((t, end, int(args["steps"])))
        elif name == "preempted":
            rt.preempted.append(t)
    for rt in out.values():
        rt.prefill.sort()
        rt.decode.sort()
        rt.queued.sort()
    return out
