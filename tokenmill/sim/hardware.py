"""Named accelerators for the roofline cost model: spec-sheet peaks, and this CPU as measured.

Peaks are the vendors' dense (no sparsity) figures for the SXM / PCIe parts
named; bandwidths in bytes per second. Nobody reaches a spec-sheet peak, so
each part carries the fraction of peak FLOP/s and of peak bandwidth that a
good kernel achieves (``flops_efficiency``, ``bandwidth_efficiency``) and a
fixed per-step overhead (scheduling, kernel launches, sampling); these are the
knobs to calibrate against a measured run. The CPU entry has no spec sheet: it
comes from ``tokenmill profile``, which times a large matmul and a large
memory sweep on this machine (``measure_cpu``).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

GiB = 1 << 30


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: dict[str, float]  # dtype -> dense FLOP/s
    mem_bandwidth: float  # bytes/s
    mem_capacity: float  # bytes per device
    link_bandwidth: float  # bytes/s per device, one direction, for tensor-parallel all-reduce
    allreduce_latency: float = 8e-6  # seconds per all-reduce call (small-message floor)
    flops_efficiency: float = 0.7
    bandwidth_efficiency: float = 0.85
    step_overhead: float = 1.5e-3  # seconds per engine step outside the kernels
    notes: dict[str, Any] = field(default_factory=dict, compare=False)

    def flops(self, dtype: str) -> float:
        """Achievable FLOP/s for matmuls in ``dtype``."""
        key = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float": "fp32"}.get(dtype, dtype)
        if key not in self.peak_flops:
            raise ValueError(f"{self.name} has no peak FLOP/s for {dtype}; known: {sorted(self.peak_flops)}")
        return self.peak_flops[key] * self.flops_efficiency

    @property
    def bandwidth(self) -> float:
        """Achievable memory bandwidth, bytes/s."""
        return self.mem_bandwidth * self.bandwidth_efficiency

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Hardware:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


T = 1e12
HARDWARE: dict[str, Hardware] = {
    # NVIDIA H100 SXM5 80GB: HBM3 3.35 TB/s, NVLink 4 900 GB/s (450 GB/s each way).
    "h100": Hardware("h100", {"fp32": 67 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T, "fp8": 1978.9 * T},
                     mem_bandwidth=3.35e12, mem_capacity=80 * GiB, link_bandwidth=450e9),
    # NVIDIA H200 SXM 141GB: same compute as H100, HBM3e 4.8 TB/s.
    "h200": Hardware("h200", {"fp32": 67 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T, "fp8": 1978.9 * T},
                     mem_bandwidth=4.8e12, mem_capacity=141e9, link_bandwidth=450e9),
    # NVIDIA A100 SXM4 80GB: HBM2e 2.039 TB/s, NVLink 3 600 GB/s (300 GB/s each way); no FP8.
    "a100": Hardware("a100", {"fp32": 19.5 * T, "tf32": 156 * T, "bf16": 312 * T, "fp16": 312 * T},
                     mem_bandwidth=2.039e12, mem_capacity=80 * GiB, link_bandwidth=300e9),
    # NVIDIA L40S 48GB: GDDR6 864 GB/s, no NVLink: tensor parallelism goes over PCIe Gen4 x16.
    "l40s": Hardware("l40s", {"fp32": 91.6 * T, "tf32": 183 * T, "bf16": 362.05 * T, "fp16": 362.05 * T, "fp8": 733 * T},
                     mem_bandwidth=864e9, mem_capacity=48e9, link_bandwidth=32e9, allreduce_latency=20e-6),
}  # fmt: skip

DEFAULT_CPU_PROFILE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tokenmill" / "cpu_hardware.json"


def get_hardware(name: str, profile: str | Path | None = None) -> Hardware:
    """A named part (``h100``, ``h200``, ``a100``, ``l40s``) or ``cpu``.

    ``cpu`` reads the ``hardware`` section of a profile written by
    ``tokenmill profile`` (``profile``), else the cached measurement of this
    machine, else measures now (a few seconds) and caches the result.
    """
    key = name.lower()
    if key in HARDWARE:
        return HARDWARE[key]
    if key != "cpu":
        raise ValueError(f"unknown hardware {name!r}; known: {', '.join(sorted(HARDWARE))}, cpu")
    if profile is not None:
        data = json.loads(Path(profile).read_text())
        if "hardware" not in data:
            raise ValueError(f"{profile} has no 'hardware' section (write it with `tokenmill profile`)")
        return Hardware.from_dict(data["hardware"])
    if DEFAULT_CPU_PROFILE.is_file():
        return Hardware.from_dict(json.loads(DEFAULT_CPU_PROFILE.read_text()))
    hw = measure_cpu()
    try:
        DEFAULT_CPU_PROFILE.parent.mkdir(parents=True, exist_ok=True)
        DEFAULT_CPU_PROFILE.write_text(json.dumps(hw.to_dict(), indent=1))
    except OSError:
        pass  # a read-only home: measure again next time
    return hw


def measure_cpu(matmul_size: int = 1024, sweep_bytes: int = 256 << 20, repeats: int = 5) -> Hardware:
    """Time this CPU: best-of-``repeats`` matmul FLOP/s (fp32, bf16) and a read sweep's bytes/s.

    The measured figures are *achieved* peaks, so the efficiencies are 1.
    The per-step overhead is left at a CPU-engine default; the profiled cost
    model measures the engine's real one.
    """
    import torch

    flops: dict[str, float] = {}
    n = matmul_size
    for key, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, dtype=dt)
        b = torch.randn(n, n, dtype=dt)
        torch.matmul(a, b)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - t0)
        flops[key] = 2 * n**3 / best
    flops["fp16"] = flops["bf16"]
    x = torch.ones(sweep_bytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    bw = sweep_bytes / best
    threads = torch.get_num_threads()
    return Hardware(
        name="cpu",
        peak_flops=flops,
        mem_bandwidth=bw,
        mem_capacity=float(_mem_total()),
        link_bandwidth=bw / 4,  # tensor parallelism on one CPU would share its memory
        allreduce_latency=5e-6,
        flops_efficiency=1.0,
        bandwidth_efficiency=1.0,
        step_overhead=1e-3,
        notes={"machine": platform.processor() or platform.machine(), "threads": threads,
               "measured": time.strftime("%Y-%m-%d %H:%M:%S")},
    )


def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * GiB


def with_overrides(hw: Hardware, **overrides: Any) -> Hardware:
    """A copy with some fields replaced (``None`` values are ignored)."""
    return replace(hw, **{k: v for k, v in overrides.items() if v is not None})
