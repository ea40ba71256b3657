"""The thread controller: its decisions from given observations, its windows, its /proc reader."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from tokenmill.model import kernels, threads
from tokenmill.model.threads import CpuSample, ProcCpuStats, ThreadController, ThreadPolicy

# -- ThreadPolicy: observations -> thread count ------------------------------------------


def test_starved_threads_drop_to_the_cores_received() -> None:
    p = ThreadPolicy()
    # two threads beside one busy process on two cores: each runs 2/3 of the time
    assert p.decide(0.0, 2, 2, waiting=0.67, idle=0.0) == 1
    # sixteen threads, one busy process: 15 cores' worth received
    assert ThreadPolicy().decide(0.0, 16, 16, waiting=0.94, idle=0.0) == 15
    assert ThreadPolicy().decide(0.0, 16, 16, waiting=5.2, idle=0.0) == 11
    # never below one thread, however starved
    assert ThreadPolicy().decide(0.0, 4, 4, waiting=9.0, idle=0.0) == 1


def test_little_waiting_or_little_idle_changes_nothing() -> None:
    p = ThreadPolicy()
    assert p.decide(0.0, 2, 2, waiting=0.3, idle=0.0) == 2  # a light neighbour: keep the threads
    assert p.decide(1.0, 1, 2, waiting=0.0, idle=0.3) == 1  # the neighbour holds the other core
    assert p.decide(2.0, 1, 1, waiting=0.0, idle=1.0) == 1  # torch's count is the ceiling


def test_idle_cores_bring_threads_back_after_the_backoff() -> None:
    p = ThreadPolicy(backoff_min=0.5)
    assert p.decide(10.0, 2, 2, waiting=0.7, idle=0.0) == 1
    assert p.decide(10.2, 1, 2, waiting=0.0, idle=1.0) == 1  # within the back-off
    assert p.decide(10.6, 1, 2, waiting=0.0, idle=1.0) == 2
    assert ThreadPolicy().decide(0.0, 4, 16, waiting=0.0, idle=2.6) == 7  # + round(idle)
    assert ThreadPolicy().decide(0.0, 15, 16, waiting=0.0, idle=3.0) == 16  # capped


def test_a_raise_starved_at_once_doubles_the_backoff_and_one_that_holds_resets_it() -> None:
    p = ThreadPolicy(backoff_min=0.5, backoff_max=4.0)
    t = 0.0
    assert p.decide(t, 2, 2, 0.7, 0.0) == 1
    assert p.backoff == 0.5
    for expected in (1.0, 2.0, 4.0, 4.0):  # idle CPUs that a quota keeps us from using
        t += p.backoff
        assert p.decide(t, 1, 2, 0.0, 1.0) == 2
        t += 0.1
        assert p.decide(t, 2, 2, 0.7, 0.0) == 1
        assert p.backoff == expected
    t += p.backoff
    assert p.decide(t, 1, 2, 0.0, 1.0) == 2
    t += 10.0  # the raise held: the next drop starts the back-off over
    assert p.decide(t, 2, 2, 0.7, 0.0) == 1
    assert p.backoff == 0.5


def test_a_lowered_ceiling_wins() -> None:
    assert ThreadPolicy().decide(0.0, 4, 2, waiting=0.0, idle=0.0) == 2


# -- ThreadController: windows of steps -> applied limits --------------------------------


class FakeStats:
    """Counters that grow by given rates per second of the fake clock."""

    def __init__(self, clock: FakeClock, cpus: int = 2) -> None:
        self.clock = clock
        self.cpus = cpus
        self.waiting = 0.0  # threads' worth of waiting from now on
        self.idle = 0.0  # idle cores from now on
        self._at = 0.0
        self._run_delay = self._idle = self._total = 0.0
        self.samples = 0

    def sample(self) -> CpuSample:
        dt = self.clock.now - self._at
        self._at = self.clock.now
        self._run_delay += self.waiting * dt
        self._idle += 100 * self.idle * dt
        self._total += 100 * self.cpus * dt
        self.samples += 1
        return CpuSample(self._run_delay, self._idle, self._total, self.cpus)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_controller(
    max_threads: int = 2,
) -> tuple[ThreadController, FakeStats, FakeClock, list[int]]:
    clock = FakeClock()
    stats = FakeStats(clock)
    applied: list[int] = []
    ctl = ThreadController(stats, applied.append, lambda: max_threads, window=0.1, clock=clock)
    return ctl, stats, clock, applied


def steps(ctl: ThreadController, clock: FakeClock, n: int, length: float, gap: float = 0.0) -> None:
    for _ in range(n):
        with ctl.step():
            clock.now += length
        clock.now += gap


def test_controller_drops_to_one_thread_when_starved_and_returns_when_cores_idle() -> None:
    ctl, stats, clock, applied = make_controller()
    steps(ctl, clock, 20, 0.01)
    assert applied == [] and ctl.threads == 2  # quiet: nothing to do
    stats.waiting = 0.67
    steps(ctl, clock, 10, 0.01)
    assert applied == [1] and ctl.threads == 1 and ctl.changes == 1
    assert ctl.last is not None and ctl.last[0] == pytest.approx(0.67)
    stats.waiting, stats.idle = 0.0, 0.0
    steps(ctl, clock, 100, 0.01)  # the busy process still holds the other core
    assert applied == [1]
    stats.idle = 0.95
    steps(ctl, clock, 10, 0.01)
    assert applied == [1, 0] and ctl.threads == 2  # 0: no limit, torch's count


def test_a_raise_is_judged_after_a_short_probe_that_never_raises_again() -> None:
    ctl, stats, clock, applied = make_controller(max_threads=4)
    stats.waiting = 3.0
    steps(ctl, clock, 11, 0.01)
    assert applied == [1]
    stats.waiting, stats.idle = 0.0, 1.0
    while len(applied) == 1:  # the back-off passes, one idle core: one more thread
        steps(ctl, clock, 1, 0.01)
    assert applied == [1, 2]
    stats.idle = 2.0
    steps(ctl, clock, 3, 0.01)  # the probe (0.025 s): idle cores, but no second raise on it
    assert applied == [1, 2]
    steps(ctl, clock, 10, 0.01)  # a full window: now
    assert applied == [1, 2, 0]
    stats.waiting, stats.idle = 1.3, 0.0  # the raise is starved: undone after the probe
    steps(ctl, clock, 3, 0.01)
    assert applied == [1, 2, 0, 3]


def test_controller_samples_once_per_window_and_ignores_gappy_windows() -> None:
    ctl, stats, clock, applied = make_controller()
    steps(ctl, clock, 100, 0.001)  # 0.1 s of steps: one window
    assert stats.samples == 2  # its start and its end, not one per step
    stats.waiting = 2.0
    # steps far apart (a request now and then): windows restart, none is judged on gaps
    steps(ctl, clock, 50, 0.01, gap=0.5)
    assert applied == []
    # gaps shorter than a window but most of it: not judged either
    steps(ctl, clock, 30, 0.01, gap=0.05)
    assert applied == []
    # busy steps with short gaps (the engine's own work between forward passes) are judged
    steps(ctl, clock, 20, 0.01, gap=0.004)
    assert applied == [1]


def test_nested_steps_count_once_and_a_disabled_controller_does_nothing() -> None:
    ctl, stats, clock, applied = make_controller()
    stats.waiting = 1.0
    for _ in range(5):
        with ctl.step():
            with ctl.step():
                clock.now += 0.01
    assert applied == []  # 0.05 s of steps, not 0.1
    ctl.enabled = False
    steps(ctl, clock, 50, 0.01)
    assert applied == [] and stats.samples == 1
    ctl.enabled = True
    steps(ctl, clock, 10, 0.01)
    assert applied == [1]
    ctl.reset()
    assert applied == [1, 0] and ctl.threads == 2


def test_controller_follows_a_lowered_torch_thread_count() -> None:
    ceiling = [4]
    clock = FakeClock()
    stats = FakeStats(clock, cpus=4)
    applied: list[int] = []
    ctl = ThreadController(stats, applied.append, lambda: ceiling[0], window=0.1, clock=clock)
    stats.waiting = 1.0
    steps(ctl, clock, 11, 0.01)
    assert applied == [3]
    ceiling[0] = 2  # torch.set_num_threads(2) meanwhile
    stats.waiting = 0.0
    steps(ctl, clock, 11, 0.01)
    assert ctl.threads == 2 and applied[-1] == 0


# -- ProcCpuStats: the Linux counters -----------------------------------------------------


def fake_proc(root: Path, delays: dict[str, int], stat_lines: list[str]) -> None:
    task = root / "self" / "task"
    task.mkdir(parents=True, exist_ok=True)
    for old in task.iterdir():
        (old / "schedstat").unlink()
        old.rmdir()
    for tid, ns in delays.items():
        (task / tid).mkdir()
        (task / tid / "schedstat").write_text(f"123456 {ns} 7\n")
    (root / "stat").write_text("\n".join(stat_lines) + "\n")


def test_proc_reader_sums_thread_waits_and_idle_ticks_of_our_cpus(tmp_path: Path) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    line = "cpu{} 100 0 50 {} 10 0 0 5 0 0"
    other = f"cpu{max(cpus) + 1} 9 9 9 999999 9 9 9 9 0 0"  # a CPU we may not run on
    fake_proc(tmp_path, {"11": 2_000_000_000, "12": 500_000_000},
              ["cpu  1 2 3 4 5 6 7 8 0 0", *(line.format(c, 1000) for c in cpus), other])  # fmt: skip
    stats = ProcCpuStats(tmp_path)
    s0 = stats.sample()
    assert s0.run_delay == pytest.approx(2.5)
    assert s0.cpus == len(cpus)
    assert s0.idle == len(cpus) * 1010 and s0.total == len(cpus) * 1165
    # thread 12 ended, 13 started; 11 waited 1 s more; every CPU idled 100 ticks more
    fake_proc(tmp_path, {"11": 3_000_000_000, "13": 250_000_000},
              [*(line.format(c, 1100) for c in cpus), other])  # fmt: skip
    s1 = stats.sample()
    assert s1.run_delay == pytest.approx(3.75)  # what 12 waited stays counted
    assert s1.idle - s0.idle == 100 * len(cpus)


def test_proc_reader_refuses_a_proc_without_counters(tmp_path: Path) -> None:
    assert not ProcCpuStats.available(tmp_path)


@pytest.mark.skipif(not ProcCpuStats.available(), reason="no Linux schedstat counters here")
def test_proc_reader_on_this_machine_counts_forward() -> None:
    stats = ProcCpuStats()
    a = stats.sample()
    sum(range(200_000))
    b = stats.sample()
    assert b.run_delay >= a.run_delay and b.total > 0 and b.idle >= a.idle


def test_controller_is_off_for_other_devices() -> None:
    assert not threads.controller("meta").enabled


def test_enabling_or_disabling_mid_step_takes_effect_at_the_next_step() -> None:
    ctl, stats, clock, applied = make_controller()
    stats.waiting = 1.0
    with ctl.step():
        ctl.enabled = False  # e.g. configure(n) from another thread
        clock.now += 0.2
    with ctl.step():
        clock.now += 0.2
    assert applied == [1]  # the step begun enabled was judged; the next was not watched
    ctl.reset()
    with ctl.step():
        ctl.enabled = True
        clock.now += 0.2
    assert applied == [1, 0]  # begun disabled: not watched, and not counted later
    steps(ctl, clock, 11, 0.01)
    assert applied == [1, 0, 1]


# -- configure: --threads auto | N ------------------------------------------------------


@pytest.fixture
def restore_threads() -> object:
    n, ctl = torch.get_num_threads(), threads._controller
    yield
    torch.set_num_threads(n)
    if isinstance(threads._controller, ThreadController):
        threads._controller.reset()
        threads._controller.enabled = True
    threads._controller = ctl
    if kernels.cpu_kernels_loaded():
        kernels.set_thread_limit(0)


@pytest.mark.usefixtures("restore_threads")
def test_configure_fixes_a_count_or_adapts() -> None:
    ctl, stats, clock, applied = make_controller()
    threads._controller = ctl
    stats.waiting = 1.0
    fixed = threads.configure(1)
    assert torch.get_num_threads() == 1 and not fixed.enabled and not ctl.enabled
    assert applied == [0]  # no limit under a fixed count
    with fixed.step():
        clock.now += 1.0
    steps(ctl, clock, 20, 0.01)  # the controller itself is off too
    assert applied == [0] and stats.samples == 0
    assert threads.configure(None) is ctl and ctl.enabled
    steps(ctl, clock, 11, 0.01)
    assert applied == [0, 0, 1]  # reset, then starved: one thread
    with pytest.raises(ValueError, match="positive number or auto"):
        threads.configure(0)


# -- the real thing: /proc counters and the kernels' OpenMP regions --------------------------

needs_kernels = pytest.mark.skipif(
    not ProcCpuStats.available() or not kernels.cpu_kernels_available(),
    reason="needs Linux schedstat counters and the CPU kernels",
)

PINNED_CHILD = """
import os, sys, torch
from tokenmill.model import kernels, threads
from tokenmill.model.backend import CpuKernelOps
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core for two threads
torch.set_num_threads(2)
ctl = threads.ThreadController(threads.ProcCpuStats(), kernels.set_thread_limit, torch.get_num_threads)
ops = CpuKernelOps(use_packed_gemm=kernels.has_avx512())
x, w = torch.randn(8, 512), ops.prepare_linear(torch.randn(2048, 512))
seen = []
for _ in range(400):
    with ctl.step():
        for _ in range(5):
            ops.linear(x, w)
    seen.append(kernels.kernel_threads())
    if ctl.changes:
        break
print(ctl.changes, kernels.kernel_threads(), ctl.last)
"""


@needs_kernels
def test_two_threads_on_one_core_drop_to_one_from_real_run_delay() -> None:
    # Linux counts the threads' waiting; the controller reads it from /proc and lowers the
    # kernels' limit (a child process: the pinning and the limit are process-wide)
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", PINNED_CHILD], capture_output=True, text=True, timeout=300
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    changes, kernel_threads, last = out.stdout.split(" ", 2)
    assert (changes, kernel_threads) == ("1", "1"), out.stdout


def _cpu_ns_by_thread() -> dict[int, int]:
    ns = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            ns[int(tid)] = int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0])
        except FileNotFoundError:
            continue
    return ns


@needs_kernels
@pytest.mark.usefixtures("restore_threads")
def test_kernels_run_on_the_limits_threads_only() -> None:
    # the OpenMP workers do part of each GEMM without a limit, and none of it under limit 1
    import threading

    from tokenmill.model.backend import CpuKernelOps

    torch.set_num_threads(2)
    ops = CpuKernelOps(use_packed_gemm=kernels.has_avx512())
    x, w = torch.randn(16, 1024), ops.prepare_linear(torch.randn(2048, 1024))
    me = threading.get_native_id()

    def workers_share(limit: int) -> float:
        kernels.set_thread_limit(limit)
        ops.linear(x, w)
        time.sleep(0.05)  # workers that spun after earlier regions are asleep by now
        before = _cpu_ns_by_thread()
        for _ in range(60):
            ops.linear(x, w)
        after = _cpu_ns_by_thread()
        grew = {t: after[t] - before.get(t, 0) for t in after}
        return sum(v for t, v in grew.items() if t != me) / max(1, grew[me])

    assert workers_share(1) < 0.05
    assert workers_share(0) > 0.3
