"""Sliding windows in the core: blocks every layer's window has passed go back to the pool.

A windowed fake executor reads each query's window only (and refuses to read a
given-back entry), so a block freed too early, or a table whose diffs lost a
change, shows up as a wrong read.
"""

from __future__ import annotations

import random

import pytest

from tests.core.fake_executor import FakeKVExecutor, reference_output
from tests.core.test_scheduler import make_config, req, run_all
from tokenmill.core.kv_manager import NULL_BLOCK
from tokenmill.core.plan import StepPlan, StepResult
from tokenmill.core.scheduler import Scheduler

WINDOW = 9  # next_token reads the last 8 tokens: a window of 9 keys sees them all


class WindowedExecutor(FakeKVExecutor):
    """Reads only the keys a query's window covers; counts live blocks."""

    def __init__(self, num_blocks: int, block_size: int, window: int) -> None:
        super().__init__(num_blocks, block_size)
        self.window = window
        self.nulls_seen = 0

    def _read(self, block_ids: list[int], n: int) -> list[int]:
        bs = self.block_size
        first = max(0, n - self.window)
        out = [0] * first  # never read: outside the window of the last query
        for pos in range(first, n):
            b = block_ids[pos // bs]
            if b == NULL_BLOCK:
                raise AssertionError(f"position {pos} is inside the window but its block was given back")
            entry = self.slots[b * bs + pos % bs]
            if entry is None or entry[0] != pos:
                raise AssertionError(f"slot for position {pos} holds {entry}")
            out.append(entry[1])
        return out

    def _check_context(self, request_id: str, ctx: list[int], tokens: list[int]) -> None:
        # only what the window sees: positions before it were given back with their blocks
        lo = max(0, len(tokens) - self.window)
        if ctx[lo:] != tokens[lo:]:
            raise AssertionError(f"{request_id}: KV read back differs from the tokens")

    def execute(self, plan: StepPlan, on_substep: object = None) -> StepResult:
        for s in plan.seqs:
            self.nulls_seen += s.block_ids.count(NULL_BLOCK)
        return super().execute(plan, on_substep)


def test_blocks_behind_the_window_are_given_back_and_outputs_hold() -> None:
    sched = Scheduler(make_config(kv_window=WINDOW, num_blocks=12, max_num_batched_tokens=8, max_decode_steps=4))
    r = req("a", list(range(1, 41)), max_tokens=60)  # 100 tokens: 25 blocks of 4, in a 12-block cache
    sched.add_request(r)
    ex = WindowedExecutor(12, 4, WINDOW)
    peak = 0
    now = 0.0
    while sched.has_unfinished():
        plan = sched.schedule(now)
        peak = max(peak, sched.kv.pool.num_used)
        table = sched.kv.tables.get("a", [])
        dead = max(0, r.num_computed_tokens - WINDOW + 1) // 4
        assert table[:dead] == [NULL_BLOCK] * dead and NULL_BLOCK not in table[dead:]
        sched.update(plan, ex.execute(plan))
        now += 1
    assert r.output_token_ids == reference_output(list(range(1, 41)), 60)
    assert peak <= 6  # the window (9 keys), a chunk of 8 and the 4 decode sub-steps, not 25 blocks
    assert ex.nulls_seen > 0  # the diffs carried the given-back entries
    assert sched.kv.pool.num_used == 0
    sched.kv.check_invariants()


def test_a_request_longer_than_the_cache_is_admitted_when_the_window_bounds_its_blocks() -> None:
    plain = Scheduler(make_config(num_blocks=12, max_num_batched_tokens=8))
    with pytest.raises(ValueError, match="holds only"):
        plain.add_request(req("a", list(range(1, 41)), max_tokens=60))
    windowed = Scheduler(make_config(kv_window=WINDOW, num_blocks=12, max_num_batched_tokens=8))
    windowed.add_request(req("a", list(range(1, 41)), max_tokens=60))  # accepted
    with pytest.raises(ValueError, match="kv_window"):
        make_config(kv_window=0)


@pytest.mark.parametrize("seed", range(4))
def test_windowed_runs_with_preemption_prefix_caching_and_multi_step_match_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    prefix = [rng.randrange(1, 97) for _ in range(14)]
    reqs = []
    for i in range(10):
        p = (prefix if i % 2 else []) + [rng.randrange(1, 97) for _ in range(rng.randint(1, 30))]
        reqs.append(req(f"r{i}", p, max_tokens=rng.randint(1, 40), t=float(i)))
    # few blocks: requests preempt one another; a shared prefix: the cache serves it
    sched = Scheduler(make_config(kv_window=WINDOW, num_blocks=16, max_num_batched_tokens=12, max_decode_steps=3))
    for r in reqs:
        sched.add_request(r)
    outs, plans = run_all(sched, WindowedExecutor(16, 4, WINDOW))
    for r in reqs:
        assert outs[r.request_id] == reference_output(r.prompt_token_ids, r.sampling_params.max_tokens)
    assert sched.num_preemptions > 0 or seed  # the first seed is tight enough to preempt


def test_a_held_request_keeps_every_block_for_export() -> None:
    sched = Scheduler(make_config(kv_window=WINDOW, num_blocks=32))
    r = req("a", list(range(1, 41)), max_tokens=1)
    r.hold_kv = True
    sched.add_request(r)
    run_all_held(sched)
    assert len(sched.kv.held["a"]) == 10 and NULL_BLOCK not in sched.kv.held["a"]
    assert sched.release_kv("a")


def run_all_held(sched: Scheduler) -> None:
    ex = FakeKVExecutor(sched.config.num_blocks, sched.config.block_size)
    now = 0.0
    while sched.has_unfinished():
        plan = sched.schedule(now)
        sched.update(plan, ex.execute(plan))
        now += 1
