"""Peak memory of a process tree, sampled from ``/proc`` while it runs (Linux).

Benchmarks compare engines that use one process (tokenmill, llama.cpp,
transformers) with engines that use several (vLLM's CPU build starts an engine
core process beside the one that calls it). Summing plain RSS over a tree
counts shared libraries once per process, so a sample here is

    sum over the tree of private anonymous memory (RssAnon: weights copied into
    the heap, KV cache, activations)
  + the largest file-backed resident set in the tree (RssFile: libraries, and
    memory-mapped weights such as llama.cpp's GGUF), counted once
  + the largest shared-memory resident set (RssShmem), counted once.

Reading ``/proc/<pid>/status`` is a few microseconds per process, and samples
are taken every ``interval`` seconds, so the sampler does not disturb the timed
run it watches.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_FIELDS = ("RssAnon", "RssFile", "RssShmem")


def _status_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in _FIELDS:
                out[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            kids.extend(int(k) for k in text.split())
    except (OSError, ValueError):
        pass
    return kids


def tree_pids(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(_children(pid))
    return pids


def tree_memory_bytes(root: int) -> int:
    """One sample of the tree's memory as defined in the module docstring (0 if it is gone)."""
    stats = [_status_kb(p) for p in tree_pids(root)]
    stats = [s for s in stats if s]
    if not stats:
        return 0
    anon = sum(s.get("RssAnon", 0) for s in stats)
    file = max(s.get("RssFile", 0) for s in stats)
    shmem = max(s.get("RssShmem", 0) for s in stats)
    return (anon + file + shmem) * 1024


class PeakMemorySampler:
    """Samples ``tree_memory_bytes(pid)`` on a daemon thread until ``stop()``; ``peak`` is the max seen."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, tree_memory_bytes(self.pid))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemorySampler:
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak

    def __exit__(self, *exc: object) -> None:
        self.stop()
