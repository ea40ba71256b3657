"""Pin the process for measuring: torch's thread count and the CPUs every thread may run on.

Profiling and validation compare times measured minutes apart; on a shared
machine the scheduler moving threads between cores (and torch spreading a
step over as many threads as there are cores, which then wait on each other
when another process takes one) adds noise that neither the profile nor the
twin can know. ``pinned(threads, cpus)`` sets both for the duration of a
block and restores them after. The affinity is set on every thread the
process has (``/proc/self/task``), since threads made before the call (torch's
pool) keep their own mask otherwise; threads made later inherit it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def parse_cpus(text: str) -> set[int]:
    """``"0"``, ``"0,2"``, ``"0-3,6"`` -> a set of CPU numbers."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            cpus.update(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError:
            raise ValueError(f"bad CPU list {text!r}: use e.g. 0, 0,2 or 0-3") from None
    if not cpus:
        raise ValueError(f"bad CPU list {text!r}: no CPU in it")
    return cpus


def _set_all(cpus: set[int]) -> None:
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, cpus)


@contextlib.contextmanager
def pinned(threads: int | None = None, cpus: set[int] | None = None) -> Iterator[dict[str, object]]:
    """Run the block with ``threads`` torch threads on ``cpus`` (None: leave that setting alone)."""
    import torch

    if cpus is not None:
        if not hasattr(os, "sched_setaffinity"):
            raise ValueError("CPU affinity is not available on this platform")
        allowed = os.sched_getaffinity(0)
        if not cpus <= allowed:
            raise ValueError(f"CPUs {sorted(cpus - allowed)} are not available (this process may use {sorted(allowed)})")
    prev_threads = torch.get_num_threads()
    prev_cpus = os.sched_getaffinity(0) if cpus is not None else None
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if cpus is not None:
            _set_all(cpus)
        yield {"threads": torch.get_num_threads(), "cpus": sorted(os.sched_getaffinity(0))}
    finally:
        torch.set_num_threads(prev_threads)
        if prev_cpus is not None:
            _set_all(prev_cpus)
