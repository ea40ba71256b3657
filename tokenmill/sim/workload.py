"""Workloads for the twin: arrival processes, length distributions, shared prefixes, tenants, traces.

A ``Workload`` is a list of ``RequestSpec`` sorted by arrival time. Specs are
light (lengths, not tokens): the simulator builds each request's prompt only
when it arrives (``Workload.prompt_tokens``) and drops it when it finishes, so
a 100,000-request run holds only the requests in flight.

Synthetic prompts are made so that prefix caching behaves as it would on real
text: requests share exactly their group's shared prefix (when they have
one) and nothing else, because the first tokens after it spell the request's
index in base ``vocab_size``. Token ids always lie in ``[0, vocab_size)``, so
the same workload can be run on the real engine.

Sources:

- ``poisson`` / ``gamma`` arrivals at a rate (gamma with a coefficient of
  variation ``cv``: cv > 1 is burstier than Poisson) or ``constant`` spacing;
- lengths from ``"fixed:N"`` (or ``"N"``), ``"uniform:A,B"``,
  ``"lognormal:MEAN,SIGMA"`` (MEAN of the lengths, SIGMA of the log),
  ``"normal:MEAN,STD"``, ``"exp:MEAN"``, or ``"azure"`` (resampled from the
  Azure trace's prompt or output lengths);
- shared-prefix groups (``groups`` system prompts of ``length`` tokens);
- multi-tenant mixes (``from_mix``): tenants with their own rates, lengths,
  prefixes and SLO class;
- JSONL traces (``from_jsonl``), one request per line: ``arrival`` (or
  ``timestamp``) seconds, ``prompt_tokens`` (list) or ``prompt_len``,
  ``output_len`` (or ``output_tokens``), optional ``client``, ``slo`` (a
  class name), ``ttft_slo`` / ``tpot_slo`` seconds, ``namespace``, ``lora``
  (the name of the LoRA adapter it runs with);
- the Azure LLM inference trace CSV (``from_azure_csv``): ``TIMESTAMP,
  ContextTokens, GeneratedTokens`` (Patel et al., Splitwise, ISCA 2024;
  Microsoft Azure Public Dataset, CC-BY 4.0).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokenmill.sim.azure_trace import AZURE_CONV_TRACE, azure_lengths, read_azure_trace

# SLO classes by name: seconds to first token, seconds per output token.
SLO_CLASSES: dict[str, dict[str, float]] = {
    "interactive": {"ttft": 0.5, "tpot": 0.05},
    "standard": {"ttft": 2.0, "tpot": 0.1},
    "batch": {"ttft": 30.0, "tpot": 1.0},
}

@dataclass(slots=True)
class RequestSpec:
    """One request of a workload, before it has tokens."""

    arrival: float
    prompt_len: int
    output_len: int
    prompt_tokens: list[int] | None = None  # given by a trace; else synthesised at arrival
    client: str = ""
    slo_class: str = ""
    ttft_slo: float | None = None
    tpot_slo: float | None = None
    prefix_group: int = -1  # index into the workload's shared prefixes, -1: none
    namespace: str = ""
    lora: str = ""  # the LoRA adapter it runs with ("": the base model)


@dataclass
class Workload:
    requests: list[RequestSpec]
    vocab_size: int = 32000
    prefixes: list[list[int]] = field(default_factory=list)
    description: dict[str, Any] = field(default_factory=dict)
    num_clipped: int = 0

    def __post_init__(self) -> None:
        self.requests.sort(key=lambda r: r.arrival)
        n = max(len(self.requests), 2)
        self._digits = max(1, math.ceil(math.log(n) / math.log(max(self.vocab_size, 2))))
        self._filler = 1 % self.vocab_size

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration(self) -> float:
        return self.requests[-1].arrival - self.requests[0].arrival if self.requests else 0.0

    def prompt_tokens(self, index: int, spec: RequestSpec) -> list[int]:
        """The prompt of request ``index``: its group's prefix, its index spelled out, then filler."""
        if spec.prompt_tokens is not None:
            return spec.prompt_tokens
        prefix = self.prefixes[spec.prefix_group] if spec.prefix_group >= 0 else []
        n_unique = spec.prompt_len - len(prefix)
        if n_unique <= 0:
            return prefix[: spec.prompt_len]
        v = self.vocab_size
        out = [self._filler] * n_unique
        x = index
        for j in range(min(self._digits, n_unique)):
            out[j] = x % v
            x //= v
        return prefix + out if prefix else out

    def clip(self, max_model_len: int) -> int:
        """Shorten prompts (then outputs) so that prompt + output fits ``max_model_len``; returns how many."""
        n = 0
        for r in self.requests:
            if r.prompt_len + r.output_len <= max_model_len and r.prompt_len < max_model_len:
                continue
            n += 1
            r.output_len = min(r.output_len, max_model_len // 2)
            r.prompt_len = max(1, min(r.prompt_len, max_model_len - r.output_len))
            if r.prompt_tokens is not None:
                r.prompt_tokens = r.prompt_tokens[: r.prompt_len]
        self.num_clipped += n
        return n

    def total_tokens(self) -> tuple[int, int]:
        return sum(r.prompt_len for r in self.requests), sum(r.output_len for r in self.requests)

    def to_jsonl(self, path: str | Path) -> None:
        with open(path, "w") as f:
            for r in self.requests:
                d: dict[str, Any] = {"arrival": r.arrival, "prompt_len": r.prompt_len, "output_len": r.output_len}
                if r.prompt_tokens is not None:
                    d["prompt_tokens"] = r.prompt_tokens
                for key in ("client", "slo_class", "namespace", "lora"):
                    if getattr(r, key):
                        d["slo" if key == "slo_class" else key] = getattr(r, key)
                if r.ttft_slo is not None:
                    d["ttft_slo"] = r.ttft_slo
                if r.tpot_slo is not None:
                    d["tpot_slo"] = r.tpot_slo
                f.write(json.dumps(d) + "\n")

    def summary(self) -> dict[str, Any]:
        p = np.array([r.prompt_len for r in self.requests]) if self.requests else np.zeros(1)
        o = np.array([r.output_len for r in self.requests]) if self.requests else np.zeros(1)
        return {
            **self.description,
            "num_requests": len(self.requests),
            "duration_s": self.duration,
            "mean_rate": len(self.requests) / self.duration if self.duration > 0 else None,
            "prompt_len": {"mean": float(p.mean()), "p50": float(np.median(p)), "max": int(p.max())},
            "output_len": {"mean": float(o.mean()), "p50": float(np.median(o)), "max": int(o.max())},
            "num_clipped": self.num_clipped,
        }


# ------------------------------------------------------------------ pieces


def arrival_times(kind: str, rate: float, n: int, rng: np.random.Generator, cv: float = 1.0, start: float = 0.0) -> np.ndarray:
    """``n`` arrival times: ``poisson``, ``gamma`` (coefficient of variation ``cv``) or ``constant``."""
    if n == 0:
        return np.zeros(0)
    if rate <= 0:
        raise ValueError(f"the arrival rate must be > 0, got {rate}")
    if kind == "poisson":
        gaps = rng.exponential(1.0 / rate, n)
    elif kind == "gamma":
        if cv <= 0:
            raise ValueError(f"the gamma coefficient of variation must be > 0, got {cv}")
        shape = 1.0 / (cv * cv)
        gaps = rng.gamma(shape, 1.0 / (rate * shape), n)
    elif kind == "constant":
        gaps = np.full(n, 1.0 / rate)
    else:
        raise ValueError(f"unknown arrival process {kind!r}; use poisson, gamma or constant")
    gaps[0] = 0.0  # the first request opens the run
    return start + np.cumsum(gaps)


class LengthDist:
    """A length distribution parsed from a spec string (see the module docstring)."""

    def __init__(self, spec: str | int, which: str = "prompt", azure_path: str | Path | None = None) -> None:
        self.spec = str(spec)
        self.which = which
        kind, _, rest = self.spec.partition(":")
        if not rest and kind.isdigit():
            kind, rest = "fixed", kind
        self.kind = kind
        try:
            self.args = [float(x) for x in rest.split(",")] if rest else []
        except ValueError:
            raise ValueError(f"bad length distribution {spec!r}") from None
        need = {"fixed": 1, "uniform": 2, "lognormal": 2, "normal": 2, "exp": 1, "azure": 0}
        if kind not in need:
            raise ValueError(f"unknown length distribution {kind!r}; use one of {', '.join(need)}")
        if len(self.args) != need[kind]:
            raise ValueError(f"length distribution {kind!r} takes {need[kind]} numbers, got {spec!r}")
        self._azure: np.ndarray | None = None
        if kind == "azure":
            prompts, outputs = azure_lengths(azure_path)
            self._azure = prompts if which == "prompt" else outputs

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        a = self.args
        if self.kind == "fixed":
            x = np.full(n, a[0])
        elif self.kind == "uniform":
            x = rng.integers(int(a[0]), int(a[1]) + 1, n)
        elif self.kind == "lognormal":
            mean, sigma = a
            x = rng.lognormal(math.log(mean) - sigma * sigma / 2, sigma, n)
        elif self.kind == "normal":
            x = rng.normal(a[0], a[1], n)
        elif self.kind == "exp":
            x = rng.exponential(a[0], n)
        else:
            assert self._azure is not None
            x = rng.choice(self._azure, n)
        return np.maximum(1, np.rint(x)).astype(np.int64)


# --------------------------------------------------------------- builders


def synthetic(
    num_requests: int,
    rate: float,
    prompt_len: str | LengthDist = "lognormal:1000,0.8",
    output_len: str | LengthDist = "lognormal:200,0.8",
    arrival: str = "poisson",
    cv: float = 1.0,
    shared_prefix_groups: int = 0,
    shared_prefix_len: int = 0,
    vocab_size: int = 32000,
    seed: int = 0,
    slo_class: str = "",
    ttft_slo: float | None = None,
    tpot_slo: float | None = None,
    azure_path: str | Path | None = None,
) -> Workload:
    """One arrival process, one pair of length distributions, optional shared-prefix groups."""
    rng = np.random.default_rng(seed)
    pd = prompt_len if isinstance(prompt_len, LengthDist) else LengthDist(prompt_len, "prompt", azure_path)
    od = output_len if isinstance(output_len, LengthDist) else LengthDist(output_len, "output", azure_path)
    times = arrival_times(arrival, rate, num_requests, rng, cv)
    plens = pd.sample(num_requests, rng)
    olens = od.sample(num_requests, rng)
    prefixes = _make_prefixes(shared_prefix_groups, shared_prefix_len, vocab_size, seed)
    groups = rng.integers(0, shared_prefix_groups, num_requests) if shared_prefix_groups else None
    ttft, tpot = _slo(slo_class, ttft_slo, tpot_slo)
    reqs = []
    for i in range(num_requests):
        g = int(groups[i]) if groups is not None else -1
        plen = int(plens[i]) + (shared_prefix_len if g >= 0 else 0)
        reqs.append(RequestSpec(float(times[i]), plen, int(olens[i]), slo_class=slo_class,
                                ttft_slo=ttft, tpot_slo=tpot, prefix_group=g))  # fmt: skip
    desc = {"kind": "synthetic", "arrival": arrival, "rate": rate, "cv": cv, "prompt_len_dist": pd.spec,
            "output_len_dist": od.spec, "shared_prefix_groups": shared_prefix_groups,
            "shared_prefix_len": shared_prefix_len, "seed": seed}  # fmt: skip
    return Workload(reqs, vocab_size=vocab_size, prefixes=prefixes, description=desc)


def _make_prefixes(groups: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed + 7919)
    return [[int(t) for t in rng.integers(0, vocab_size, length)] for _ in range(groups)]


def _slo(cls: str, ttft: float | None, tpot: float | None) -> tuple[float | None, float | None]:
    if cls:
        if cls not in SLO_CLASSES:
            raise ValueError(f"unknown SLO class {cls!r}; known: {', '.join(SLO_CLASSES)}")
        base = SLO_CLASSES[cls]
        return (base["ttft"] if ttft is None else ttft), (base["tpot"] if tpot is None else tpot)
    return ttft, tpot


def from_mix(config: dict[str, Any], vocab_size: int = 32000, seed: int = 0,
             azure_path: str | Path | None = None) -> Workload:  # fmt: skip
    """A multi-tenant mix. ``config``::

        {"duration": 60,                       # seconds of arrivals (or "num_requests": N)
         "slo_classes": {"gold": {"ttft": 0.5, "tpot": 0.04}},   # optional, adds to SLO_CLASSES
         "tenants": [{"name": "chat", "rate": 4.0, "arrival": "poisson", "cv": 1.0,
                      "prompt_len": "lognormal:800,0.6", "output_len": "lognormal:200,0.8",
                      "slo": "interactive", "shared_prefix": {"groups": 8, "length": 512}}, ...]}

    With ``num_requests``, tenants split it in proportion to their rates.
    """
    classes = {**SLO_CLASSES, **config.get("slo_classes", {})}
    tenants = config.get("tenants") or []
    if not tenants:
        raise ValueError("a mix needs at least one tenant")
    total_rate = sum(float(t["rate"]) for t in tenants)
    rng = np.random.default_rng(seed)
    reqs: list[RequestSpec] = []
    prefixes: list[list[int]] = []
    for ti, t in enumerate(tenants):
        name = t.get("name", f"tenant{ti}")
        rate = float(t["rate"])
        if "num_requests" in config:
            n = int(round(config["num_requests"] * rate / total_rate))
        else:
            n = int(rng.poisson(rate * float(config.get("duration", 60.0))))
        kind, _, cv = str(t.get("arrival", "poisson")).partition(":")
        times = arrival_times(kind, rate, n, rng, float(cv or t.get("cv", 1.0)))
        if n and kind != "constant":
            times = times + rng.exponential(1.0 / rate)  # tenants do not all open at t = 0
        pl = LengthDist(t.get("prompt_len", "lognormal:1000,0.8"), "prompt", azure_path).sample(n, rng)
        ol = LengthDist(t.get("output_len", "lognormal:200,0.8"), "output", azure_path).sample(n, rng)
        slo = t.get("slo", "")
        if isinstance(slo, dict):
            cls_name, ttft, tpot = name, slo.get("ttft"), slo.get("tpot")
        else:
            if slo and slo not in classes:
                raise ValueError(f"tenant {name!r}: unknown SLO class {slo!r}")
            cls_name = slo
            ttft, tpot = (classes[slo]["ttft"], classes[slo]["tpot"]) if slo else (None, None)
        sp = t.get("shared_prefix") or {}
        g0 = len(prefixes)
        ng, plen = int(sp.get("groups", 0)), int(sp.get("length", 0))
        prefixes.extend(_make_prefixes(ng, plen, vocab_size, seed + 101 * (ti + 1)))
        groups = rng.integers(0, ng, n) if ng else None
        for i in range(n):
            g = g0 + int(groups[i]) if groups is not None else -1
            reqs.append(RequestSpec(float(times[i]), int(pl[i]) + (plen if g >= 0 else 0), int(ol[i]),
                                    client=name, slo_class=cls_name, ttft_slo=ttft, tpot_slo=tpot,
                                    prefix_group=g))  # fmt: skip
    if reqs:
        t0 = min(r.arrival for r in reqs)
        for r in reqs:
            r.arrival -= t0
    desc = {"kind": "mix", "tenants": [t.get("name", f"tenant{i}") for i, t in enumerate(tenants)], "seed": seed}
    return Workload(reqs, vocab_size=vocab_size, prefixes=prefixes, description=desc)


def from_jsonl(path: str | Path, vocab_size: int = 32000, time_scale: float = 1.0) -> Workload:
    """A JSONL trace (fields in the module docstring); arrivals are shifted to start at 0."""
    reqs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                d = json.loads(line)
                arrival = float(d.get("arrival", d.get("timestamp", 0.0)))
                toks = d.get("prompt_tokens")
                plen = len(toks) if toks is not None else int(d["prompt_len"])
                olen = int(d.get("output_len", d.get("output_tokens", d.get("max_tokens", 0))))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{n}: bad trace line ({e})") from None
            if plen < 1 or olen < 1:
                raise ValueError(f"{path}:{n}: prompt and output lengths must be >= 1")
            slo = d.get("slo", "")
            ttft, tpot = d.get("ttft_slo"), d.get("tpot_slo")
            if slo in SLO_CLASSES:
                ttft = SLO_CLASSES[slo]["ttft"] if ttft is None else ttft
                tpot = SLO_CLASSES[slo]["tpot"] if tpot is None else tpot
            if toks is not None and any(not 0 <= int(t) < vocab_size for t in toks):
                raise ValueError(f"{path}:{n}: a prompt token lies outside [0, {vocab_size})")
            reqs.append(RequestSpec(arrival, plen, olen, prompt_tokens=[int(t) for t in toks] if toks is not None else None,
                                    client=str(d.get("client", "")), slo_class=str(slo), ttft_slo=ttft,
                                    tpot_slo=tpot, namespace=str(d.get("namespace", "")),
                                    lora=str(d.get("lora", ""))))  # fmt: skip
    if reqs:
        t0 = min(r.arrival for r in reqs)
        for r in reqs:
            r.arrival = (r.arrival - t0) * time_scale
    return Workload(reqs, vocab_size=vocab_size, description={"kind": "jsonl", "path": str(path), "time_scale": time_scale})


def from_azure_csv(
    path: str | Path | None = None,
    num_requests: int | None = None,
    arrival: str = "trace",
    rate: float | None = None,
    time_scale: float = 1.0,
    vocab_size: int = 32000,
    seed: int = 0,
    start: float = 0.0,
) -> Workload:
    """The Azure LLM inference trace.

    ``arrival="trace"`` replays its timestamps (times ``time_scale``: 0.5
    plays it twice as fast), from ``start`` seconds into it, for up to
    ``num_requests`` requests. ``arrival="poisson"`` (or ``gamma``) draws
    ``num_requests`` arrivals at ``rate`` and resamples (prompt, output)
    pairs from the trace, which makes runs longer than the trace possible.
    """
    rows = read_azure_trace(path)
    t_first = rows[0][0]
    reqs: list[RequestSpec] = []
    if arrival == "trace":
        for ts, ctx, gen in rows:
            t = ts - t_first
            if t < start:
                continue
            reqs.append(RequestSpec((t - start) * time_scale, max(1, ctx), max(1, gen)))
            if num_requests is not None and len(reqs) >= num_requests:
                break
    else:
        if rate is None or num_requests is None:
            raise ValueError("resampling the Azure trace needs a rate and a number of requests")
        rng = np.random.default_rng(seed)
        times = arrival_times(arrival, rate, num_requests, rng)
        idx = rng.integers(0, len(rows), num_requests)
        for i in range(num_requests):
            _, ctx, gen = rows[int(idx[i])]
            reqs.append(RequestSpec(float(times[i]), max(1, ctx), max(1, gen)))
    desc = {"kind": "azure", "path": str(path or AZURE_CONV_TRACE), "arrival": arrival, "rate": rate,
            "time_scale": time_scale, "seed": seed,
            "attribution": "Azure LLM inference trace 2023 (Patel et al., Splitwise, ISCA 2024), CC-BY 4.0"}  # fmt: skip
    return Workload(reqs, vocab_size=vocab_size, description=desc)
