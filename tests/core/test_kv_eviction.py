"""KV eviction in the core: budgets, entry counts, block tables and the record of kept positions.

An evicting fake executor stores (position, token) per KV entry, evicts like
StreamingLLM after every sub-step, compacts entries into the holes and reads
every entry back through the block table. Its "model" reads the last 8
tokens, so with a recent window of 9 or more the outputs must equal the
reference, while the KV held stays within the budget.
"""

from __future__ import annotations

import random

import pytest

from tests.core.fake_executor import next_token, reference_output
from tests.core.test_scheduler import make_config, req
from tokenmill.core.executor_state import ExecutorState
from tokenmill.core.kv_eviction import KVEviction
from tokenmill.core.plan import StepPlan, StepResult
from tokenmill.core.scheduler import Scheduler


class EvictingExecutor:
    max_model_len = 1 << 20
    vocab_size = 97
    eos_token_ids: tuple[int, ...] = ()

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.slots: list[tuple[int, int] | None] = [None] * (num_blocks * block_size)
        self.state = ExecutorState()
        self.entries: dict[str, list[int]] = {}  # request -> position held by each entry
        self.specs: dict[str, KVEviction] = {}

    def _slot(self, blocks: list[int], i: int) -> int:
        return blocks[i // self.block_size] * self.block_size + i % self.block_size

    def _write(self, rid: str, blocks: list[int], pos: int, token: int) -> None:
        ent = self.entries[rid]
        self.slots[self._slot(blocks, len(ent))] = (pos, token)
        ent.append(pos)

    def _evict(self, rid: str, blocks: list[int]) -> list[int]:
        spec, ent = self.specs[rid], self.entries[rid]
        excess = len(ent) - spec.budget
        if excess <= 0:
            return []
        newest = max(ent)
        order = sorted(i for i, p in enumerate(ent) if p >= spec.sinks and p <= newest - spec.window)
        victims = sorted(order[:excess])
        gone = [ent[i] for i in victims]
        new_len = len(ent) - excess
        movers = [i for i in range(new_len, len(ent)) if i not in victims]
        for hole, mover in zip([v for v in victims if v < new_len], movers, strict=True):
            self.slots[self._slot(blocks, hole)] = self.slots[self._slot(blocks, mover)]
            ent[hole] = ent[mover]
        del ent[new_len:]
        return gone

    def _context(self, rid: str, blocks: list[int], history: list[int]) -> dict[int, int]:
        out = {}
        for i, pos in enumerate(self.entries[rid]):
            entry = self.slots[self._slot(blocks, i)]
            if entry != (pos, history[pos]):
                raise AssertionError(f"{rid}: entry {i} should hold position {pos}, holds {entry}")
            out[pos] = entry[1]
        return out

    def execute(self, plan: StepPlan, on_substep: object = None) -> StepResult:
        for rid in plan.finished_ids + plan.preempted_ids:
            self.entries.pop(rid, None)
        sampled: dict[str, list[int]] = {}
        evicted: dict[str, list[int]] = {}
        for s, view in zip(plan.seqs, self.state.apply(plan), strict=True):
            rid = s.request_id
            if s.setup is not None:
                self.entries[rid] = []
                assert s.setup.kv_eviction is not None
                self.specs[rid] = s.setup.kv_eviction
            assert len(self.entries[rid]) == s.start_pos - s.kv_offset, "the plan's entry count is off"
            history = view.token_ids()
            for i, t in enumerate(s.token_ids):
                self._write(rid, view.blocks, s.start_pos + i, t)
            evicted.setdefault(rid, []).extend(self._evict(rid, view.blocks))
            if not s.samples:
                continue
            end = s.start_pos + s.num_new_tokens
            out: list[int] = []
            for step in range(plan.num_steps):
                if step > 0:
                    self._write(rid, view.blocks, end, out[-1])
                    end += 1
                ctx = self._context(rid, view.blocks, history + out)
                # the model reads the last 8 tokens: all inside the recent window
                full = (history + out)[:end]
                assert all(ctx.get(p) == full[p] for p in range(max(0, end - 8), end))
                out.append(next_token(full))
                if step > 0:
                    evicted[rid].extend(self._evict(rid, view.blocks))
            sampled[rid] = out
        self.state.record(sampled)
        return StepResult(sampled, duration=0.001 * plan.num_steps, kv_evicted=evicted)


def run(sched: Scheduler, ex: EvictingExecutor, reqs: list) -> dict[str, int]:
    """Run to the end; returns each request's peak blocks."""
    peak: dict[str, int] = {}
    now = 0.0
    while sched.has_unfinished():
        plan = sched.schedule(now)
        for r in reqs:
            peak[r.request_id] = max(peak.get(r.request_id, 0), len(sched.kv.tables.get(r.request_id, [])))
        result = ex.execute(plan)
        sched.update(plan, result)
        for r in reqs:
            if r.request_id in sched.kv.tables:
                kept = sched.kv.kept_positions(r)
                assert sorted(ex.entries[r.request_id]) == kept  # the core's record is the executor's
                ev = r.kv_eviction
                assert len(kept) == min(r.num_computed_tokens, ev.budget)
                n = r.num_computed_tokens
                if n > ev.budget and ev.policy == "streaming":
                    assert kept == list(range(ev.sinks)) + list(range(n - ev.window, n))
        now += 1
    assert sched.kv.pool.num_used == 0 and not sched.kv.evicted
    return peak


def evicting(rid: str, prompt: list[int], max_tokens: int, budget: int = 16, sinks: int = 2, t: float = 0.0):
    r = req(rid, prompt, max_tokens=max_tokens, t=t)
    r.kv_eviction = KVEviction("streaming", budget, sinks=sinks)
    return r


@pytest.mark.parametrize(("chunk", "steps"), [(4, 1), (32, 4), (64, 8)])
def test_streaming_keeps_sinks_and_recent_within_budget_and_outputs_hold(chunk: int, steps: int) -> None:
    sched = Scheduler(make_config(num_blocks=64, max_num_batched_tokens=chunk, max_decode_steps=steps))
    r = evicting("a", [random.Random(1).randrange(1, 97) for _ in range(50)], max_tokens=40)
    sched.add_request(r)
    peak = run(sched, EvictingExecutor(64, 4), [r])
    assert r.output_token_ids == reference_output(r.prompt_token_ids, 40)
    # 90 tokens without eviction: 23 blocks; with a 16-entry budget: the budget, a chunk, the sub-steps
    assert peak["a"] <= -(-(16 + max(chunk, steps)) // 4)


def test_evicting_requests_share_a_tight_cache_with_preemption_and_plain_requests() -> None:
    rng = random.Random(7)
    reqs = []
    for i in range(8):
        p = [rng.randrange(1, 97) for _ in range(rng.randint(5, 40))]
        reqs.append(evicting(f"e{i}", p, rng.randint(5, 40), budget=rng.choice([12, 16, 20]), t=float(i)))
    sched = Scheduler(make_config(num_blocks=24, max_num_batched_tokens=16, max_decode_steps=3))
    for r in reqs:
        sched.add_request(r)
    run(sched, EvictingExecutor(24, 4), reqs)
    for r in reqs:
        assert r.output_token_ids == reference_output(r.prompt_token_ids, r.sampling_params.max_tokens)
    assert sched.num_preemptions > 0


def test_evicting_requests_bypass_the_prefix_cache_and_may_outgrow_the_cache() -> None:
    prompt = list(range(1, 41))
    sched = Scheduler(make_config(num_blocks=16, max_num_batched_tokens=8, max_model_len=256))
    plain = req("p", prompt, max_tokens=2)
    sched.add_request(plain)
    while sched.has_unfinished():  # the plain request leaves its prompt in the prefix cache
        plan = sched.schedule(0.0)
        sched.update(plan, StepResult({s.request_id: [5] for s in plan.seqs if s.samples}))
    long = evicting("a", prompt * 3, max_tokens=30)  # 150 tokens: 38 blocks, in a 16-block cache
    sched.add_request(long)
    assert sched.kv.get_computed_blocks(req("x", prompt * 3)) != []
    assert sched.kv.get_computed_blocks(long) == []
    run(sched, EvictingExecutor(16, 4), [long])
    assert long.output_token_ids == reference_output(prompt * 3, 30)
    assert sched.kv.prefix_hit_tokens == 0
    with pytest.raises(ValueError, match="holds only"):
        Scheduler(make_config(num_blocks=16, max_num_batched_tokens=8, max_model_len=256)).add_request(
            req("b", prompt * 3, max_tokens=30)
        )
    held = evicting("h", prompt, max_tokens=1)
    held.hold_kv = True
    with pytest.raises(ValueError, match="hold_kv"):
        sched.add_request(held)


def test_the_budget_must_hold_sinks_and_the_recent_window() -> None:
    with pytest.raises(ValueError, match=r"kv_budget 100 is smaller than kv_sinks \+ kv_recent = 4 \+ 128"):
        KVEviction("h2o", 100, sinks=4, recent=128)
    with pytest.raises(ValueError, match="unknown KV eviction policy 'lru'"):
        KVEviction("lru", 100)
    with pytest.raises(ValueError, match="kv_budget must be an integer >= 1"):
        KVEviction("streaming", 0)
    assert KVEviction("streaming", 64, sinks=4).window == 60
    assert KVEviction("h2o", 64, sinks=4).window == 32
    assert KVEviction("streaming", 64).entries(10) == 10 and KVEviction("streaming", 64).entries(100) == 64
