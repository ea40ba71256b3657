"""The process-tree memory sampler sees memory held by a child and by a grandchild."""

from __future__ import annotations

import subprocess
import sys

from tokenmill.bench.process_memory import PeakMemorySampler, tree_memory_bytes, tree_pids

# Holds ``MB`` MiB of touched, private memory for a moment; with ``spawn`` set, a
# child of its own holds the same again (the shape of a multi-process engine).
HOLDER = """
import os, subprocess, sys, time
mb, spawn = int(sys.argv[1]), sys.argv[2] == "1"
buf = bytearray(mb << 20)
for i in range(0, len(buf), 4096): buf[i] = 1
kid = subprocess.Popen([sys.executable, "-c", __import__("sys").argv[3], str(mb), "0", ""]) if spawn else None
time.sleep(3.0)
if kid: kid.wait()
"""


def _peak(mb: int, spawn: bool) -> tuple[int, list[int]]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(mb), "1" if spawn else "0", HOLDER])
    seen: list[int] = []
    with PeakMemorySampler(proc.pid, interval=0.05) as sampler:
        import time

        # Wait for the tree to take shape (a loaded machine can take seconds to start a child).
        want = 2 if spawn else 1
        deadline = time.monotonic() + 20
        seen = tree_pids(proc.pid)
        while len(seen) < want and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            seen = tree_pids(proc.pid)
        proc.wait()
    return sampler.peak, seen


def test_peak_covers_the_childs_private_memory() -> None:
    peak, pids = _peak(200, spawn=False)
    assert len(pids) == 1
    assert 200 << 20 <= peak < 400 << 20


def test_peak_sums_private_memory_over_the_tree() -> None:
    peak, pids = _peak(150, spawn=True)
    assert len(pids) == 2
    assert 300 << 20 <= peak < 500 << 20  # both processes' 150 MiB, the interpreter counted once


def test_a_finished_process_measures_zero() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert tree_memory_bytes(proc.pid) == 0
