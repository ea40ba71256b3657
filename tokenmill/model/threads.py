"""How many threads the CPU kernels use: as many as the cores this process actually gets.

A decode step runs ~150 OpenMP parallel regions, and OpenMP's threads spin
between them (waking a sleeping thread costs more than a small region does).
On cores that serve the model alone that is fastest. When another busy process
shares the cores, one of the threads is descheduled for a time slice now and
then while the others spin at the end of the region waiting for it: batch-1
decode ran 14-35x slower than with one thread (docs/benchmarks.md, "Threads
under contention").

``ThreadController`` wraps each model step and, over windows of ~0.1 s of
steps, reads two things Linux counts: how long this process's threads were
runnable but waiting for a CPU (``run_delay`` of ``/proc/self/task/*/schedstat``),
and how much of the CPUs this process may run on sat idle (``/proc/stat``).
``ThreadPolicy`` turns them into a thread count: waiting that adds up to half
a thread or more means threads are starved, and the count drops to the cores
actually received; idle CPUs worth three quarters of a core raise it again, after a
back-off that doubles whenever a raise is starved at once (a CPU quota, a load
that comes and goes); a raise is judged after a short probe (25 ms of steps), so
one the cores cannot carry is undone quickly. The count reaches the kernels through
``kernels.set_thread_limit``; torch's thread count stays the ceiling.

No counters (not Linux), one thread, or ``TOKENMILL_ADAPTIVE_THREADS=0``: the
kernels keep torch's count, as before. ``configure(n)`` (``--threads N``) fixes the
count at ``n`` instead; ``configure(None)`` (``--threads auto``, the default) adapts.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from types import TracebackType
from typing import Protocol

import torch

from tokenmill.model import kernels

logger = logging.getLogger(__name__)

ENV_SWITCH = "TOKENMILL_ADAPTIVE_THREADS"


@dataclass(frozen=True, slots=True)
class CpuSample:
    """Cumulative counters at one moment.

    ``run_delay`` is the seconds this process's threads have spent runnable but
    waiting for a CPU; ``idle`` and ``total`` are clock ticks of the CPUs the
    process may run on (idle ones, and all), of which there are ``cpus``.
    """

    run_delay: float
    idle: float
    total: float
    cpus: int


class CpuStats(Protocol):
    def sample(self) -> CpuSample: ...


@dataclass(slots=True)
class ThreadPolicy:
    """Decides a thread count from one window's observations (pure: the clock is given).

    ``waiting`` is threads' worth of waiting for a CPU over the window (0.67 for
    two threads sharing two cores with one busy process: each runs two thirds
    of the time); ``idle`` is cores' worth of idle CPU.
    """

    down_at: float = 0.5  # threads' worth of waiting that removes threads
    up_at: float = 0.75  # idle cores that add threads (most of a core: half of one starves them)
    backoff_min: float = 0.5  # seconds before removed threads may come back
    backoff_max: float = 16.0
    backoff: float = field(init=False)
    _next_up: float = field(default=-math.inf, init=False)
    _raised_at: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.backoff = self.backoff_min

    def decide(
        self, now: float, threads: int, max_threads: int, waiting: float, idle: float
    ) -> int:
        if threads > max_threads:
            return max_threads
        if threads > 1 and waiting >= self.down_at:
            # as many threads as the cores received (threads - waiting), rounded
            fewer = min(threads - 1, max(1, math.floor(threads - waiting + 0.5)))
            # a raise that is starved within its back-off was a mistake: wait longer next time
            if self._raised_at is not None and now - self._raised_at <= self.backoff:
                self.backoff = min(2 * self.backoff, self.backoff_max)
            else:
                self.backoff = self.backoff_min
            self._raised_at = None
            self._next_up = now + self.backoff
            return fewer
        if threads < max_threads and idle >= self.up_at and now >= self._next_up:
            self._raised_at = now
            return min(max_threads, threads + max(1, math.floor(idle + 0.5)))
        return threads


def _read_head(path: str, until: bytes = b"") -> bytes:
    """A /proc file's start (up to the line starting with ``until``, or all of it).

    os.read, not Path.read_text: a window reads one file per thread, ~10 us each this way.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        data = b""
        while chunk := os.read(fd, 1 << 16):
            data += chunk
            if until and until in data:
                break
        return data
    finally:
        os.close(fd)


class ProcCpuStats:
    """``CpuStats`` from Linux's ``/proc`` (per-thread schedstat and ``/proc/stat``)."""

    def __init__(self, proc: str | Path = "/proc") -> None:
        self._tasks = os.path.join(proc, "self", "task")
        self._stat = os.path.join(proc, "stat")
        self._cpus = {f"cpu{i}".encode() for i in os.sched_getaffinity(0)}
        self._delays: dict[str, int] = {}  # run_delay (ns) of each thread last seen
        self._run_delay_ns = 0  # sum of increases: threads that end keep their share

    @classmethod
    def available(cls, proc: str | Path = "/proc") -> bool:
        try:
            cls(proc).sample()
        except (OSError, ValueError, IndexError):
            return False
        return True

    def sample(self) -> CpuSample:
        delays: dict[str, int] = {}
        for tid in os.listdir(self._tasks):
            try:
                stat = _read_head(os.path.join(self._tasks, tid, "schedstat"))
            except FileNotFoundError:  # the thread ended meanwhile
                continue
            delays[tid] = int(stat.split()[1])
        for tid, ns in delays.items():
            self._run_delay_ns += max(0, ns - self._delays.get(tid, 0))
        self._delays = delays
        idle = total = cpus = 0
        for line in _read_head(self._stat, until=b"\nintr").splitlines():
            name, _, rest = line.partition(b" ")
            if name in self._cpus:
                # user nice system idle iowait irq softirq steal (guest time is inside user)
                ticks = [int(v) for v in rest.split()[:8]]
                idle += ticks[3] + ticks[4]
                total += sum(ticks)
                cpus += 1
        if not cpus:
            raise ValueError(f"no line of {self._stat} for this process's CPUs")
        return CpuSample(self._run_delay_ns / 1e9, idle, total, cpus)


class ThreadController:
    """Wraps model steps (``with controller.step(): ...``) and sets the kernels' thread count.

    ``max_threads`` (torch's thread count) is the ceiling, read at every
    decision; ``apply(n)`` sets the count (``kernels.set_thread_limit``, 0 for
    no limit). A window is judged once it holds ``window`` seconds of steps (``probe``
    seconds after a raise: threads that the cores cannot carry run ~10x slower, so a
    raise is judged as soon as the counters can tell), if
    the steps filled a quarter of it or more: the idle CPU of gaps between
    requests says nothing about contention (a gap longer than a window starts a
    new one; the engine's own work between forward passes is a shorter gap).
    """

    def __init__(
        self,
        stats: CpuStats,
        apply: Callable[[int], object],
        max_threads: Callable[[], int],
        *,
        policy: ThreadPolicy | None = None,
        window: float = 0.1,
        probe: float = 0.025,
        clock: Callable[[], float] = perf_counter,
    ) -> None:
        self.stats = stats
        self.policy = policy or ThreadPolicy()
        self.window = window
        self.probe = min(probe, window)
        self._length = window  # of the window being filled
        self._apply = apply
        self._max_threads = max_threads
        self._clock = clock
        self.enabled = True  # False: steps run at the limit set now, unwatched
        self.threads = max_threads()
        self.changes = 0
        self.last: tuple[float, float] | None = None  # (waiting, idle) of the last window judged
        self._depth = 0
        self._watched = False
        self._entered = 0.0
        self._busy = 0.0
        self._last_exit = -math.inf
        self._start: tuple[float, CpuSample] | None = None

    def step(self) -> ThreadController:
        return self

    def __enter__(self) -> None:
        self._depth += 1
        if self._depth > 1:
            return
        # a step watched or not, whole: enabling or disabling mid-step takes effect at the next
        self._watched = self.enabled
        if not self._watched:
            return
        now = self._clock()
        if self._start is None or now - self._last_exit > self.window:
            # the first step, or one after a gap: a fresh window
            self._start = (now, self.stats.sample())
            self._busy = 0.0
        self._entered = now

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._depth -= 1
        if self._depth or not self._watched or self._start is None:  # None: reset mid-step
            return
        now = self._clock()
        self._busy += now - self._entered
        self._last_exit = now
        if self._busy >= self._length:
            self._judge(now)

    def _judge(self, now: float) -> None:
        assert self._start is not None
        t0, s0 = self._start
        s1 = self.stats.sample()
        span = now - t0
        if span > 0 and self._busy >= 0.25 * span:
            waiting = (s1.run_delay - s0.run_delay) / span
            ticks = s1.total - s0.total
            idle = s1.cpus * (s1.idle - s0.idle) / ticks if ticks > 0 else 0.0
            self.last = (waiting, idle)
            ceiling = max(1, self._max_threads())
            threads = self.policy.decide(now, min(self.threads, ceiling), ceiling, waiting, idle)
            if self._length < self.window:
                # a probe judges the last raise: /proc/stat's 10 ms ticks are too coarse over
                # so short a window to raise again on
                threads = min(threads, self.threads)
            raised = threads > self.threads
            if threads != self.threads:
                logger.debug(
                    "kernel threads %d -> %d (waiting for a CPU %.2f threads, idle %.2f cores)",
                    self.threads, threads, waiting, idle,
                )  # fmt: skip
                self._apply(0 if threads >= ceiling else threads)
                self.threads = threads
                self.changes += 1
            self._length = self.probe if raised else self.window
        self._start = (now, s1)
        self._busy = 0.0

    def reset(self) -> None:
        """Back to torch's thread count, forgetting what was seen."""
        self._apply(0)
        self.threads = self._max_threads()
        self.policy = ThreadPolicy(
            self.policy.down_at, self.policy.up_at, self.policy.backoff_min, self.policy.backoff_max
        )
        self._start = None
        self._busy = 0.0
        self._length = self.window


class _Off:
    """The controller where none applies: steps run as they are."""

    enabled = False
    threads = 0
    changes = 0
    last = None

    def step(self) -> _Off:
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None

    def reset(self) -> None:
        return None


_controller: ThreadController | _Off | None = None


def controller(device: torch.device | str = "cpu") -> ThreadController | _Off:
    """This process's controller (one: threads and cores are the process's, not a model's).

    It adapts for CPU models when the CPU kernels are loaded, Linux's counters can be read, and
    ``TOKENMILL_ADAPTIVE_THREADS`` is not ``0``; otherwise steps run unchanged.
    """
    global _controller
    if torch.device(device).type != "cpu":
        return _Off()
    if _controller is None:
        if not kernels.cpu_kernels_loaded():
            return _Off()  # not decided yet: the kernels may load later
        on = os.environ.get(ENV_SWITCH, "1") != "0" and ProcCpuStats.available()
        _controller = (
            ThreadController(ProcCpuStats(), kernels.set_thread_limit, torch.get_num_threads)
            if on
            else _Off()
        )
    return _controller


def configure(threads: int | None, device: torch.device | str = "cpu") -> ThreadController | _Off:
    """Sets how many threads this process's CPU kernels use, and returns what wraps model steps.

    ``None`` ("auto"): the controller adapts the count, torch's thread count the ceiling.
    ``n``: exactly ``n`` threads (``torch.set_num_threads(n)``), whatever the load, as with
    ``OMP_NUM_THREADS=n`` and no controller. The setting is the process's, like torch's count.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be a positive number or auto, got {threads}")
        torch.set_num_threads(threads)
    ctl = controller(device)
    if isinstance(ctl, ThreadController):
        ctl.reset()  # a fixed count has no limit under it; an adaptive one starts from the top
        ctl.enabled = threads is None
    return ctl if threads is None else _Off()
