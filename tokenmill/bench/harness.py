"""Shared machinery for the scheduling benchmarks: workloads, two backends, metrics, output.

One workload (a list of ``WorkItem``) runs on either backend:

- ``sim``: the core ``Scheduler`` in virtual time, driven by a linear cost
  model of step time (``LinearCostModel``, defined here; it prices a plan
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
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.core.plan import StepPlan, StepResult
from tokenmill.core.request import Request, SamplingParams
from tokenmill.core.scheduler import Scheduler, SchedulerConfig

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


# ------------------------------------------------------------ cost model (sim)


@dataclass
class LinearCostModel:
    """Step time linear in the work of a plan (illustrative GPU-class defaults, not measured).

    ``step_s`` per step (launch and host overhead), ``token_s`` per batched
    token (the weight GEMMs), ``decode_ctx_s`` per KV token a decode row
    reads, ``prefill_pair_s`` per causal query-key pair of a prefill chunk.
    A multi-step plan costs its sub-steps summed.
    """

    step_s: float = 0.004
    token_s: float = 20e-6
    decode_ctx_s: float = 10e-9
    prefill_pair_s: float = 0.5e-9

    def plan_time(self, plan: StepPlan) -> float:
        total = 0.0
        for k in range(plan.num_steps):
            tokens = ctx = pairs = 0
            for s in plan.seqs:
                if k > 0 and not s.samples:
                    continue
                n = s.num_new_tokens if k == 0 else 1
                start = s.start_pos if k == 0 else s.start_pos + s.num_new_tokens + k - 1
                tokens += n
                if n == 1:
                    ctx += start + 1
                else:
                    pairs += n * start + n * (n + 1) // 2
            total += self.step_s + self.token_s * tokens + self.decode_ctx_s * ctx + self.prefill_pair_s * pairs
        return total

    def describe(self) -> str:
        return (
            f"linear cost model: {self.step_s * 1e3:g} ms/step + {self.token_s * 1e6:g} us/token + "
            f"{self.decode_ctx_s * 1e9:g} ns/decode KV token + {self.prefill_pair_s * 1e9:g} ns/prefill pair"
        )


# ----------------------------------------------------------------- backends


@dataclass
class SchedParams:
    """What a benchmark run varies; the rest comes from the command line."""

    num_blocks: int
    policy: str = "fcfs"
    policy_options: dict[str, Any] = field(default_factory=dict)
    enable_prefix_caching: bool = True


class SimBackend:
    """The core scheduler in virtual time with ``LinearCostModel``."""

    name = "sim"

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cost = LinearCostModel(
            step_s=args.step_ms / 1e3,
            token_s=args.token_us / 1e6,
            decode_ctx_s=args.decode_ctx_ns / 1e9,
            prefill_pair_s=args.prefill_pair_ns / 1e9,
        )

    def describe(self) -> str:
        return f"sim: core Scheduler in virtual time, bench {self.cost.describe()}"

    def run(self, items: Sequence[WorkItem], params: SchedParams, label: str) -> RunResult:
        args = self.args
        max_len = max(len(w.prompt) + w.output_len for w in items) + 1
        sched = Scheduler(
            SchedulerConfig(
                num_blocks=params.num_blocks,
                block_size=args.block_size,
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                max_model_len=max_len,
                enable_prefix_caching=params.enable_prefix_caching,
                max_decode_steps=1,  # one step per plan: arrivals are never overrun
                policy=params.policy,
                policy_options=dict(params.policy_options),
            )
        )
        wall0 = time.perf_counter()
        arrivals = ArrivalQueue(items)
        now = t0 = arrivals.start
        reqs: dict[str, tuple[WorkItem, Request]] = {}
        service: list[tuple[float, str, int]] = []
        prefill = 0
        while arrivals or sched.has_unfinished():
            for w in arrivals.due(now):
                r = to_request(w)
                r.arrival_time = arrivals.arrival[w.request_id]
                sched.add_request(r, r.arrival_time)
                reqs[w.request_id] = (w, r)
            plan = sched.schedule(now)
            if plan.is_empty:
                nxt = arrivals.next_time()
                if nxt is None:
                    raise RuntimeError("the scheduler is stuck: requests left but nothing scheduled")
                now = max(now, nxt)
                continue
            dur = self.cost.plan_time(plan)
            end = now + dur
            sampled: dict[str, list[int]] = {}
            for s in plan.seqs:
                if s.is_prefill:
                    prefill += s.num_new_tokens
                if s.samples:
                    sampled[s.request_id] = [1] * plan.num_steps
            for u in sched.update(plan, StepResult(sampled_token_ids=sampled, duration=dur)):
                r = u.request
                # Service as fair-share policies count it: the whole prompt with the first token, then each output.
                first = len(u.new_token_ids) == r.num_output_tokens
                service.append((end - t0, r.client_id, len(u.new_token_ids) + (r.num_prompt_tokens if first else 0)))
                if u.finished:
                    arrivals.finished(u.request_id, end)
            now = end
        records = []
        for w, r in reqs.values():
            records.append(
                RequestRecord(
                    request_id=w.request_id,
                    client_id=w.client_id,
                    priority=w.priority,
                    arrival=r.arrival_time - t0,
                    first_token=None if r.first_token_time is None else r.first_token_time - t0,
                    finish=None if r.finish_time is None else r.finish_time - t0,
                    prompt_len=len(w.prompt),
                    output_len=r.num_output_tokens,
                    cached_tokens=max(0, r.num_cached_tokens),
                    ttft_slo=w.ttft_slo,
                    tpot_slo=w.tpot_slo,
                )
            )
        return RunResult(
            label=label,
            backend=self.name,
            records=records,
            duration=now - t0,
            prefill_tokens=prefill,
            num_preemptions=sched.num_preemptions,
            service=service,
            wall_s=time.perf_counter() - wall0,
        )


def to_request(w: WorkItem) -> Request:
    return Request(
        request_id=w.request_id,
        prompt_token_ids=list(w.prompt),
        sampling_params=SamplingParams(temperature=0.0, max_tokens=w.output_len, ignore_eos=True),
        arrival_time=w.arrival,
        client_id=w.client_id,
        priority=w.priority,
        ttft_slo=w.ttft_slo,
        tpot_slo=w.tpot_slo,
        predicted_output_len=w.predicted_output_len,
    )


TINY_LLAMA = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
)  # fmt: skip
TINY_VOCAB = 512


def make_tiny_model(path: Path, seed: int = 0, vocab_size: int = TINY_VOCAB) -> Path:
    """A tiny Llama with seeded random weights and a word-level tokenizer, saved as a HF checkpoint."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, **TINY_LLAMA)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t0", pad_token="t0").save_pretrained(path)
    return path


def kv_bytes_per_block(model_dir: Path, block_size: int, dtype_bytes: int = 4) -> int:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * block_size * kv_heads * head_dim * dtype_bytes


class EngineBackend:
    """The real engine on this machine, requests added at their arrival times (wall clock)."""

    name = "engine"

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        # Multi-threaded CPU kernels collapse (100x slower steps, measured) when the
        # cores are shared with other busy processes; one thread is the honest default there.
        torch.set_num_threads(args.threads)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if args.model in (None, "tiny"):
            self._tmp = tempfile.TemporaryDirectory(prefix="tokenmill-bench-")
            self.model_dir = make_tiny_model(Path(self._tmp.name), seed=args.seed)
            self.model_desc = f"tiny random Llama {TINY_LLAMA} (seed {args.seed})"
        elif args.model == "default":
            from tokenmill.models import DEFAULT_MODEL_PATH

            self.model_dir = Path(DEFAULT_MODEL_PATH)
            self.model_desc = f"bundled default model ({self.model_dir})"
        else:
            self.model_dir = Path(args.model)
            self.model_desc = str(self.model_dir)
        cfg = json.loads((self.model_dir / "config.json").read_text())
        self.vocab_size = int(cfg["vocab_size"])
        self.max_model_len = int(cfg.get("max_position_embeddings", 2048))

    def describe(self) -> str:
        return (
            f"engine: tokenmill Engine, wall clock, {platform.machine()} CPU, {self.args.threads} torch thread(s), "
            f"float32, model: {self.model_desc}"
        )

    def run(self, items: Sequence[WorkItem], params: SchedParams, label: str) -> RunResult:
        from tokenmill.engine import Engine, EngineConfig

        args = self.args
        bpb = kv_bytes_per_block(self.model_dir, args.block_size)
        engine = Engine(
            EngineConfig(
                model=str(self.model_dir),
                dtype="float32",
                kv_cache_memory=params.num_blocks * bpb,
                block_size=args.block_size,
                max_num_batched_tokens=args.max_num_batched_tokens,
                max_num_seqs=args.max_num_seqs,
                enable_prefix_caching=params.enable_prefix_caching,
                policy=params.policy,
                policy_options=dict(params.policy_options),
                max_decode_steps=args.max_decode_steps,
            ),
            clock=time.perf_counter,
        )
        # Warm up kernels outside the measurement, in a cache namespace no workload uses.
        engine.add_request("warmup", [1] * 32, SamplingParams(max_tokens=4, ignore_eos=True), cache_namespace="warmup")
        while engine.has_unfinished():
            engine.step()
        prefill0 = engine.stats().num_prompt_tokens
        preempt0 = engine.stats().scheduler.num_preemptions

        by_id = {w.request_id: w for w in items}
        arrivals = ArrivalQueue(items)
        base = arrivals.start
        first: dict[str, float] = {}
        finish: dict[str, float] = {}
        cached: dict[str, int] = {}
        n_out: dict[str, int] = {}
        service: list[tuple[float, str, int]] = []
        wall0 = t0 = time.perf_counter()
        while arrivals or engine.has_unfinished():
            now = time.perf_counter() - t0
            for w in arrivals.due(now + base):
                engine.add_request(
                    w.request_id,
                    list(w.prompt),
                    SamplingParams(temperature=0.0, max_tokens=w.output_len, ignore_eos=True),
                    arrival_time=t0 + arrivals.arrival[w.request_id] - base,
                    client_id=w.client_id,
                    priority=w.priority,
                    ttft_slo=w.ttft_slo,
                    tpot_slo=w.tpot_slo,
                    predicted_output_len=w.predicted_output_len,
                )
            if not engine.has_unfinished():
                nxt = arrivals.next_time()
                time.sleep(max(0.0, min(0.01, (nxt if nxt is not None else now + base) - base - now)))
                continue
            for out in engine.step():
                t = time.perf_counter() - t0
                w = by_id[out.request_id]
                new = sum(len(o.delta_token_ids) for o in out.outputs)
                served = new
                if out.request_id not in first:
                    m = out.metrics
                    first[out.request_id] = (m.first_token_time - t0) if m and m.first_token_time else t
                    cached[out.request_id] = out.num_cached_tokens
                    served += len(w.prompt)
                n_out[out.request_id] = n_out.get(out.request_id, 0) + new
                service.append((t, w.client_id, served))
                if out.finished:
                    m = out.metrics
                    finish[out.request_id] = (m.finished_time - t0) if m and m.finished_time else t
                    arrivals.finished(out.request_id, base + finish[out.request_id])
        end = time.perf_counter() - t0
        stats = engine.stats()
        records = [
            RequestRecord(
                request_id=w.request_id,
                client_id=w.client_id,
                priority=w.priority,
                arrival=arrivals.arrival.get(w.request_id, w.arrival) - base,
                first_token=first.get(w.request_id),
                finish=finish.get(w.request_id),
                prompt_len=len(w.prompt),
                output_len=n_out.get(w.request_id, 0),
                cached_tokens=cached.get(w.request_id, 0),
                ttft_slo=w.ttft_slo,
                tpot_slo=w.tpot_slo,
            )
            for w in items
        ]
        return RunResult(
            label=label,
            backend=self.name,
            records=records,
            duration=end,
            prefill_tokens=stats.num_prompt_tokens - prefill0,
            num_preemptions=stats.scheduler.num_preemptions - preempt0,
            service=service,
            wall_s=time.perf_counter() - wall0,
        )


def make_backend(args: argparse.Namespace) -> SimBackend | EngineBackend:
    return EngineBackend(args) if args.backend == "engine" else SimBackend(args)


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
