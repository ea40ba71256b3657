"""Shared machinery for the scheduling benchmarks: workloads, results and metrics, the command line, output.

One workload (a list of ``WorkItem``) runs on either backend (``bench/backends.py``):

- ``sim``: the core ``Scheduler`` in virtual time, driven by a linear cost
  model of step time (``LinearCostModel``; it prices a plan
  from its batched tokens, decode context and prefill attention pairs). No
  torch, no wall clock: a run is deterministic and takes seconds.
- ``engine``: the real ``tokenmill.engine.Engine`` with a model on this
  machine's CPU, requests added at their arrival times in wall-clock time,
  TTFT measured from the engine's own request metrics. By default the model
  is a tiny Llama with seeded random weights written to a temporary
  directory (token ids are all a benchmark needs).

Either way the policies, the prefix cache and the KV manager are the real
core objects; only the executor differs. Every run returns a ``RunResult``
with per-request records and a log of tokens served per client over time,
from which the benchmarks compute TTFT percentiles, hit rates, goodput and
per-window service.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------ workloads


@dataclass
class WorkItem:
    """One request of a workload; ``arrival`` is seconds after the run starts."""

    request_id: str
    prompt: list[int]
    output_len: int
    arrival: float = 0.0
    client_id: str = ""
    priority: int = 0
    ttft_slo: float | None = None
    tpot_slo: float | None = None
    predicted_output_len: int | None = None
    # Closed-loop clients: when set, the request is sent ``arrival`` seconds after
    # the request named here finishes, rather than at a fixed time.
    follows: str | None = None


class ArrivalQueue:
    """When each request of a workload arrives, releasing closed-loop follow-ups as requests finish."""

    def __init__(self, items: Sequence[WorkItem]) -> None:
        self._heap: list[tuple[float, int, WorkItem]] = []
        self._deps: dict[str, list[WorkItem]] = {}
        self._seq = itertools.count()
        self.arrival: dict[str, float] = {}  # actual arrival times
        for w in items:
            if w.follows is None:
                heapq.heappush(self._heap, (w.arrival, next(self._seq), w))
            else:
                self._deps.setdefault(w.follows, []).append(w)
        self.start = self._heap[0][0] if self._heap else 0.0

    def __bool__(self) -> bool:
        return bool(self._heap)

    def next_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> list[WorkItem]:
        out = []
        while self._heap and self._heap[0][0] <= now:
            t, _, w = heapq.heappop(self._heap)
            self.arrival[w.request_id] = t
            out.append(w)
        return out

    def finished(self, request_id: str, t: float) -> None:
        for w in self._deps.pop(request_id, []):
            heapq.heappush(self._heap, (t + w.arrival, next(self._seq), w))


def poisson_arrivals(n: int, rate: float, rng: random.Random, start: float = 0.0) -> list[float]:
    """``n`` arrival times of a Poisson process at ``rate`` per second; ``rate <= 0``: all at ``start``."""
    if rate <= 0:
        return [start] * n
    t, out = start, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def random_tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    # Token 0 is EOS for the tiny model; benchmarks ignore EOS anyway, but keep prompts clean.
    return [rng.randrange(1, vocab) for _ in range(n)]


# ------------------------------------------------------------------ results


@dataclass
class RequestRecord:
    request_id: str
    client_id: str
    priority: int
    arrival: float  # seconds after the run started
    first_token: float | None
    finish: float | None
    prompt_len: int
    output_len: int
    cached_tokens: int
    ttft_slo: float | None = None
    tpot_slo: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.first_token is None or self.finish is None or self.output_len < 2:
            return None
        return (self.finish - self.first_token) / (self.output_len - 1)

    def meets_slo(self) -> bool:
        """TTFT within ``ttft_slo`` and mean time per output token within ``tpot_slo`` (when set)."""
        if self.ttft is None:
            return False
        if self.ttft_slo is not None and self.ttft > self.ttft_slo:
            return False
        tpot = self.tpot
        return not (self.tpot_slo is not None and tpot is not None and tpot > self.tpot_slo)


@dataclass
class RunResult:
    label: str
    backend: str
    records: list[RequestRecord]
    duration: float  # first arrival to last finish, seconds
    prefill_tokens: int  # prompt (and recomputed) tokens actually computed
    num_preemptions: int
    # (time, client, tokens served): a request's whole prompt with its first token, then each output token
    service: list[tuple[float, str, int]] = field(default_factory=list)
    wall_s: float = 0.0  # how long the run took on this machine

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_len for r in self.records)

    @property
    def hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache at first admission, over all prompt tokens."""
        return sum(r.cached_tokens for r in self.records) / max(1, self.prompt_tokens)

    def ttfts(self, client: str | None = None) -> list[float]:
        return [r.ttft for r in self.records if r.ttft is not None and (client is None or r.client_id == client)]

    def output_throughput(self) -> float:
        return sum(r.output_len for r in self.records) / self.duration if self.duration > 0 else 0.0

    def goodput(self) -> tuple[int, float]:
        """Requests that met their SLO: (count, per second of run)."""
        n = sum(1 for r in self.records if r.meets_slo())
        return n, n / self.duration if self.duration > 0 else 0.0

    def service_windows(self, window: float, clients: Sequence[str]) -> dict[str, list[int]]:
        """Tokens served (prompt + output) per client in consecutive windows of ``window`` seconds."""
        n = max(1, math.ceil(self.duration / window))
        out = {c: [0] * n for c in clients}
        for t, c, k in self.service:
            if c in out:
                out[c][min(n - 1, int(t / window))] += k
        return out

    def summary(self) -> dict[str, Any]:
        ttft = self.ttfts()
        good, good_rate = self.goodput()
        return {
            "label": self.label,
            "backend": self.backend,
            "requests": len(self.records),
            "duration_s": self.duration,
            "ttft_p50_s": percentile(ttft, 50),
            "ttft_p90_s": percentile(ttft, 90),
            "ttft_p99_s": percentile(ttft, 99),
            "tpot_mean_s": mean([r.tpot for r in self.records if r.tpot is not None]),
            "output_tokens_per_s": self.output_throughput(),
            "prompt_tokens": self.prompt_tokens,
            "prefill_tokens_computed": self.prefill_tokens,
            "token_hit_rate": self.hit_rate,
            "goodput_requests": good,
            "goodput_per_s": good_rate,
            "preemptions": self.num_preemptions,
            "wall_s": self.wall_s,
        }


def percentile(xs: Sequence[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def mean(xs: Sequence[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or ``b`` is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


# ------------------------------------------------------------ command line


def add_common_arguments(p: argparse.ArgumentParser, *, max_num_seqs: int = 64, budget: int = 2048) -> None:
    g = p.add_argument_group("backend")
    g.add_argument("--backend", choices=["sim", "engine"], default="sim",
                   help="sim: core scheduler in virtual time with a linear cost model; engine: the real engine on CPU")
    g.add_argument("--model", default="tiny",
                   help="engine backend: 'tiny' (random Llama made in a temp dir), 'default' (bundled) or a HF directory")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--max-num-seqs", type=int, default=max_num_seqs)
    g.add_argument("--max-num-batched-tokens", type=int, default=budget)
    g.add_argument("--max-decode-steps", type=int, default=1, help="engine backend: decode steps per plan")
    g.add_argument("--threads", type=int, default=1, help="engine backend: torch CPU threads")
    g.add_argument("--step-ms", type=float, default=4.0, help="sim cost model: fixed time per step")
    g.add_argument("--token-us", type=float, default=20.0, help="sim cost model: time per batched token")
    g.add_argument("--decode-ctx-ns", type=float, default=10.0, help="sim cost model: per KV token read by a decode")
    g.add_argument("--prefill-pair-ns", type=float, default=0.5, help="sim cost model: per prefill attention pair")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default=None, help="directory for the JSON result and the PNG plot (default out/bench/NAME)")
    g.add_argument("--no-plot", action="store_true", help="skip the matplotlib plot")


def script_main(
    name: str,
    doc: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    argv: list[str] | None = None,
) -> int:
    """``python -m tokenmill.bench.<name>``: the same flags and run as ``tokenmill bench <name>``."""
    p = argparse.ArgumentParser(
        prog=f"python -m tokenmill.bench.{name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    return run(p.parse_args(argv))


def out_dir(args: argparse.Namespace, name: str) -> Path:
    d = Path(args.out) if args.out else Path("out") / "bench" / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def args_record(args: argparse.Namespace) -> dict[str, Any]:
    """A run's settings for its JSON result: the parsed flags, without what the CLI adds.

    ``tokenmill bench`` stores the function that runs the command on the
    namespace (``func``); it is not a setting and not JSON.
    """
    return {k: v for k, v in vars(args).items() if not callable(v)}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    def default(o: Any) -> Any:
        if hasattr(o, "__dataclass_fields__"):
            return asdict(o)
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serializable: {type(o).__name__}")

    path.write_text(json.dumps(payload, indent=2, default=default) + "\n")


def new_figure(ncols: int, title: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4.0), squeeze=False)
    fig.suptitle(title, fontsize=10)
    return fig, axes[0]


def save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(x: float | None, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if unit == "s":
        return f"{x * 1e3:.1f} ms" if abs(x) < 1 else f"{x:.2f} s"
    if unit == "%":
        return f"{100 * x:.1f}%"
    if unit == "x":
        return f"{x:.2f}x"
    return f"{x:.{digits}g}"


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """Print ``rows`` with ``columns`` given as (key, header, unit)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([fmt(r.get(k), u) if not isinstance(r.get(k), str) else r[k] for k, _, u in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
