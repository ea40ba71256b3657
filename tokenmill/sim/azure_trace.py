"""The Azure LLM inference trace: where it is and how to read it.

``TIMESTAMP, ContextTokens, GeneratedTokens`` per request (Patel et al.,
Splitwise, ISCA 2024; Microsoft Azure Public Dataset, CC-BY 4.0; a copy with
its attribution is in ``data/traces/``). The twin's workloads
(``sim.workload``) and ``tokenmill bench serve`` both read it here.
"""

from __future__ import annotations

import functools
from datetime import datetime
from pathlib import Path

import numpy as np

# The trace ships with the repository (data/traces/, with its attribution); a
# checkout beside the shared trace folder also works.
_AZURE_NAME = "azure-llm-inference-2023-conv.csv"
_ROOT = Path(__file__).resolve().parents[2]
AZURE_CONV_TRACE = next(
    (p for p in (_ROOT / "data" / "traces" / _AZURE_NAME, _ROOT.parent / "shared" / "traces" / _AZURE_NAME) if p.is_file()),
    _ROOT / "data" / "traces" / _AZURE_NAME,
)


def azure_lengths(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The trace's prompt lengths and output lengths."""
    rows = read_azure_trace(path)
    return np.array([r[1] for r in rows]), np.array([r[2] for r in rows])


@functools.lru_cache(maxsize=4096)
def _parse_second(base: str) -> float:
    return datetime.strptime(base, "%Y-%m-%d %H:%M:%S").timestamp()


def _parse_ts(s: str) -> float:
    # "2023-11-16 18:15:46.6805900": seven fractional digits, more than strptime takes.
    base, _, frac = s.strip().partition(".")
    return _parse_second(base) + (float("0." + frac) if frac else 0.0)


def read_azure_trace(path: str | Path | None = None) -> list[tuple[float, int, int]]:
    """``(timestamp seconds, context tokens, generated tokens)`` rows, sorted by time."""
    p = Path(path) if path is not None else AZURE_CONV_TRACE
    if not p.is_file():
        raise FileNotFoundError(f"Azure trace not found at {p}; pass its path")
    rows = []
    with open(p) as f:
        header = f.readline().strip().split(",")
        if header[:3] != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
            raise ValueError(f"{p} is not an Azure LLM inference trace (header {header})")
        for line in f:
            ts, ctx, gen = line.strip().split(",")[:3]
            rows.append((_parse_ts(ts), int(ctx), int(gen)))
    rows.sort(key=lambda r: r[0])
    return rows
