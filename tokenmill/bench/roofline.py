"""This machine's limits, measured in the same run as a benchmark.

Memory bandwidth (a streaming read of a buffer far larger than the caches)
and matmul throughput per dtype give a lower bound on the time of a
generation job: each decode step must read every weight once and do
2 x params FLOPs per sequence; prefill does 2 x body params FLOPs per
prompt token (the LM head runs only on the last token).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class MachineLimits:
    bandwidth_gbs: float  # GB/s, streaming read
    matmul_gflops: dict[str, float]  # dtype name -> GFLOP/s


def _best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_bandwidth(num_bytes: int = 512 << 20, repeat: int = 5) -> float:
    buf = torch.ones(num_bytes // 4, dtype=torch.float32)
    buf.sum()  # touch the pages
    return num_bytes / _best_of(lambda: buf.sum(), repeat) / 1e9


def measure_matmul(dtype: torch.dtype, n: int = 2048, repeat: int = 5) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    return 2 * n**3 / _best_of(lambda: a @ b, repeat) / 1e9


def measure(dtypes: list[str]) -> MachineLimits:
    return MachineLimits(
        bandwidth_gbs=measure_bandwidth(),
        matmul_gflops={d: measure_matmul(getattr(torch, d)) for d in dtypes},
    )


def job_tokens_per_s(
    limits: MachineLimits,
    dtype: str,
    total_params: int,
    body_params: int,
    bytes_per_param: float,
    batch: int,
    prompt_len: int,
    output_len: int,
) -> float:
    """Upper bound on output tokens/s of the job (prefill included) on this machine."""
    flops = limits.matmul_gflops[dtype] * 1e9
    bw = limits.bandwidth_gbs * 1e9
    prefill = max(2 * body_params * batch * prompt_len / flops, body_params * bytes_per_param / bw)
    step = max(total_params * bytes_per_param / bw, 2 * total_params * batch / flops)
    return batch * output_len / (prefill + output_len * step)
