"""``tokenmill bench contention`` at a tiny size: every mode reports quiet and busy runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tokenmill.bench import contention
from tokenmill.model import kernels, threads


def test_busy_processes_spin_and_are_gone_after_the_block() -> None:
    with contention.Busy(2) as busy:
        assert len(busy.procs) == 2 and all(p.poll() is None for p in busy.procs)
    assert all(p.returncode is not None for p in busy.procs)


def test_busy_processes_end_with_a_benchmark_killed_before_cleaning_up() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", "import os, subprocess, sys; c = subprocess.Popen([sys.executable, "
         "'-c', sys.argv[1], str(os.getpid())]); print(c.pid, flush=True)", contention.BUSY_LOOP],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    child = int(parent.stdout.readline())
    parent.wait()  # exits without killing its busy child
    stat = Path(f"/proc/{child}/stat")
    deadline = time.monotonic() + 10
    while stat.exists() and stat.read_text().split()[2] != "Z" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not stat.exists() or stat.read_text().split()[2] == "Z"


def test_contention_bench_smoke(
    tmp_path: Path, tiny_model_dir, capsys: pytest.CaptureFixture[str]
) -> None:
    if not kernels.cpu_kernels_available() or not isinstance(
        threads.controller(), threads.ThreadController
    ):
        pytest.skip("no thread controller here (no CPU kernels or no /proc counters)")
    out = tmp_path / "contention.json"
    assert contention.main([
        "--models", str(tiny_model_dir("llama")), "--dtypes", "float32", "--repeats", "1",
        "--prompt-len", "8", "--output-len", "4", "--settle", "0.05", "--result-file", str(out),
    ]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in rows] == ["adaptive", "fixed", "single"]
    for r in rows:
        assert len(r["quiet_runs"]) == len(r["busy_runs"]) == 1
        assert r["quiet"] > 0 and r["busy"] > 0
        assert r["quiet_over_busy"] == pytest.approx(r["quiet"] / r["busy"])
        assert r["pair_ratio_median"] == pytest.approx(r["quiet_runs"][0] / r["busy_runs"][0])
        assert len(r["load_before"]) == 3
        assert set(r["others_cores"]) == {"quiet", "busy"}
    assert rows[2]["threads_after"] == {"quiet": [1], "busy": [1]}
    assert rows[1]["thread_changes_while_timed"] == {"quiet": [0], "busy": [0]}
    assert "quiet/busy" in capsys.readouterr().out
    # the bench leaves the controller on
    assert threads.controller().enabled
