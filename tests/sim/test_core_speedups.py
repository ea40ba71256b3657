"""The twin's speed-ups to the core change no decision.

- Prefix-cache eviction now pops leaves from an incrementally kept heap
  instead of scanning the whole tree on every call; against the original
  implementation (``_reference_prefix_cache``) it must return the same matches
  and evict the same blocks in the same order, leaving identical pools.
- ``Request.append_output`` skips its per-token loop when no token can stop the
  request; a scheduler run with stop tokens in play is compared with one that
  never takes the fast path.
- ``Scheduler.shorten_plan`` leaves the KV state a plan made with
  ``max_steps`` would have left.
"""

from __future__ import annotations

import random

import pytest

from tests.sim import _reference_prefix_cache as ref
from tokenmill.core.block_pool import BlockPool
from tokenmill.core.plan import StepResult
from tokenmill.core.prefix_cache import PrefixCache
from tokenmill.core.request import Request, SamplingParams
from tokenmill.core.scheduler import Scheduler, SchedulerConfig


def _pool_state(pool: BlockPool) -> tuple:
    return (pool.free_ids(), list(pool.ref_counts), list(pool.cached), pool.num_evictable)


@pytest.mark.parametrize("seed", range(6))
def test_eviction_heap_matches_full_scan(seed: int) -> None:
    rng = random.Random(seed)
    bs, nb = 2, 24
    pools = [BlockPool(nb), BlockPool(nb)]
    caches = [PrefixCache(pools[0], bs), ref.PrefixCache(pools[1], bs)]
    held: list[list[int]] = []  # block tables, identical in both worlds
    for _ in range(1500):
        op = rng.random()
        ns = rng.choice(["", "x"])
        toks = [rng.randint(0, 1) for _ in range(rng.randint(0, 12))]
        if op < 0.2:
            assert caches[0].match(toks, ns) == caches[1].match(toks, ns)
        elif op < 0.7:
            # A request: match, lock, allocate the rest (evicting), insert, swap duplicates.
            n_keys = len(toks) // bs
            matched = [c.match(toks, ns) for c in caches]
            assert matched[0] == matched[1]
            m = matched[0]
            need = n_keys - len(m)
            unowned = sum(1 for b in m if pools[0].ref_counts[b] == 0)
            if need > pools[0].num_free + pools[0].num_evictable - unowned:
                continue
            tables = []
            for c, p in zip(caches, pools, strict=True):
                c.lock(m)
                short = need - p.num_free
                if short > 0:
                    assert c.evict(short) == short
                table = m + p.pop_free(need)
                tree = c.insert(toks, table, ns)
                for i, b in enumerate(tree):
                    if table[i] != b:
                        p.incref([b])
                        p.decref([table[i]])
                        table[i] = b
                tables.append(table)
            assert tables[0] == tables[1]
            assert _pool_state(pools[0]) == _pool_state(pools[1])
            if rng.random() < 0.5:
                held.append(tables[0])
            else:
                for c in caches:
                    c.unlock(tables[0][::-1])
        elif op < 0.85 and held:
            t = held.pop(rng.randrange(len(held)))
            for c in caches:
                c.unlock(t[::-1])
        else:
            n = rng.randint(0, nb)
            assert caches[0].evict(n) == caches[1].evict(n)
        assert _pool_state(pools[0]) == _pool_state(pools[1])
        pools[0].check_invariants()


def _run_scheduler(use_reference: bool, seed: int, stop_tokens: bool, max_decode_steps: int = 4) -> list:
    rng = random.Random(seed)
    cfg = SchedulerConfig(num_blocks=40, block_size=4, max_num_seqs=6, max_num_batched_tokens=24,
                          max_model_len=96, max_decode_steps=max_decode_steps, debug_checks=True)  # fmt: skip
    sched = Scheduler(cfg)
    if use_reference:
        sched.kv.cache = ref.PrefixCache(sched.kv.pool, cfg.block_size)  # type: ignore[assignment]
    prefixes = [[rng.randint(0, 50) for _ in range(12)] for _ in range(3)]
    trace = []
    now = 0.0
    n_added = 0
    for _ in range(400):
        if n_added < 60 and rng.random() < 0.3:
            prompt = rng.choice(prefixes) + [rng.randint(0, 50) for _ in range(rng.randint(1, 20))]
            sp = SamplingParams(max_tokens=rng.randint(2, 30), stop_token_ids=[7] if stop_tokens else None,
                                min_tokens=2 if stop_tokens else 0)  # fmt: skip
            sched.add_request(Request(f"r{n_added}", prompt, sp, arrival_time=now, eos_token_ids=(3,)), now)
            n_added += 1
        if not sched.has_unfinished():
            continue
        plan = sched.schedule(now)
        # Tokens are a function of the request and position, so both worlds sample alike.
        toks = {s.request_id: [(hash((s.request_id, s.start_pos + s.num_new_tokens + j)) % 11) for j in range(plan.num_steps)]
                for s in plan.seqs if s.samples}  # fmt: skip
        ups = sched.update(plan, StepResult(toks, duration=0.01))
        trace.append((plan.summary(), [(u.request_id, u.new_token_ids, u.finish_reason) for u in ups],
                      sched.kv.pool.free_ids()))  # fmt: skip
        now += 0.01
    return trace


@pytest.mark.parametrize("seed", range(3))
def test_scheduler_decisions_unchanged_by_eviction_heap(seed: int) -> None:
    assert _run_scheduler(False, seed, stop_tokens=False) == _run_scheduler(True, seed, stop_tokens=False)


def test_append_tokens_fast_path_matches_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = _run_scheduler(False, 11, stop_tokens=True)
    # Force the per-token loop everywhere by making every request look like it has stop tokens.
    original = Request.append_output

    def slow(self: Request, tokens: list[int], max_model_len: int):  # type: ignore[no-untyped-def]
        sp = self.sampling_params
        old = sp.stop_token_ids
        sp.stop_token_ids = list(old or []) + [t + 1000 for t in tokens]  # never sampled, but defeats the fast path
        try:
            return original(self, tokens, max_model_len)
        finally:
            sp.stop_token_ids = old

    monkeypatch.setattr(Request, "append_output", slow)
    assert _run_scheduler(False, 11, stop_tokens=True) == fast


def test_shorten_plan_equals_capped_plan() -> None:
    def setup() -> Scheduler:
        s = Scheduler(SchedulerConfig(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                                      max_model_len=128, max_decode_steps=16, debug_checks=True))  # fmt: skip
        for i in range(3):
            s.add_request(Request(f"r{i}", list(range(i, i + 5 + 3 * i)), SamplingParams(max_tokens=40)), 0.0)
        plan = s.schedule(0.0)
        s.update(plan, StepResult({x.request_id: [1] for x in plan.seqs}, duration=0.1))
        return s

    a, b = setup(), setup()
    pa = a.schedule(1.0)
    assert pa.num_steps == 16
    a.shorten_plan(pa, 5)
    pb = b.schedule(1.0, max_steps=5)
    assert pa.summary() == pb.summary()
    # Block ids may differ; what each request holds and what is free may not.
    assert {r: len(t) for r, t in a.kv.tables.items()} == {r: len(t) for r, t in b.kv.tables.items()}
    assert (a.kv.pool.num_free, a.kv.pool.num_evictable) == (b.kv.pool.num_free, b.kv.pool.num_evictable)
    # And the runs go on alike, a newcomer included.
    for s in (a, b):
        s.update(pa if s is a else pb, StepResult({x.request_id: [1] * 5 for x in pa.seqs}, duration=0.5))
        s.add_request(Request("late", list(range(50, 70)), SamplingParams(max_tokens=8)), 1.5)
    for t in range(30):
        plans = [s.schedule(2.0 + t) for s in (a, b)]
        assert plans[0].summary() == plans[1].summary()
        for s, p in zip((a, b), plans, strict=True):
            s.update(p, StepResult({x.request_id: [2] * p.num_steps for x in p.seqs if x.samples}, duration=0.5))
