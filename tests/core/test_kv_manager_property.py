"""Property test: the KV manager and block pool against a brute-force model.

Requests are admitted (matching the prefix cache), decode one token at a time,
put their full blocks into the cache, finish, get aborted, or are preempted
and re-admitted, in random order, as the scheduler would drive them. The
model tracks what each block holds (token by token, as a paged executor would
write it) and each request's expected block table, and checks:

- every block is in exactly one state (free / owned / cached-evictable) and
  the counts add up to the pool size; ref counts equal table multiplicities;
- a block is only ever written while its one owner holds it and it is not in
  the prefix cache (shared KV is immutable);
- blocks served by the prefix cache hold exactly the request's tokens;
- ``allocate_slots`` fails exactly when the pool (free + evictable, minus the
  matched blocks it would take) is short, and then changes nothing;
- a finished, aborted or preempted request owns no blocks;
- slots reserved for a multi-step plan and cut before use go back whole.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tokenmill.core.kv_manager import KVManager
from tokenmill.core.request import Request, SamplingParams

BLOCK = 2
NUM_BLOCKS = 10

prompt_st = st.lists(st.integers(0, 2), min_size=1, max_size=4 * BLOCK + 1)


class KVModel(RuleBasedStateMachine):
    @initialize(caching=st.booleans(), ns=st.sampled_from(["", "salt"]))
    def setup(self, caching: bool, ns: str) -> None:
        self.kv = KVManager(NUM_BLOCKS, BLOCK, enable_prefix_caching=caching)
        self.pool = self.kv.pool
        self.alt_ns = ns
        self.content: dict[int, list[int | None]] = {}
        self.running: dict[str, Request] = {}
        self.preempted: dict[str, Request] = {}
        self.n = 0

    # ---------------------------------------------------------------- helpers

    def write(self, req: Request, start: int, stop: int) -> None:
        """A paged executor writes the KV of tokens [start, stop) of ``req``."""
        table = self.kv.block_table(req.request_id)
        toks = req.all_token_ids
        for p in range(start, stop):
            b = table[p // BLOCK]
            assert self.pool.ref_counts[b] == 1, f"block {b} is shared but written"
            assert not self.pool.cached[b], f"block {b} is in the prefix cache but written"
            self.content.setdefault(b, [None] * BLOCK)[p % BLOCK] = toks[p]

    def check_table_content(self, req: Request) -> None:
        """The first ``num_computed_tokens`` tokens' KV is what the request holds."""
        table = self.kv.block_table(req.request_id)
        assert len(table) >= self.kv.blocks_for(req.num_computed_tokens)
        toks = req.all_token_ids
        for p in range(req.num_computed_tokens):
            assert self.content[table[p // BLOCK]][p % BLOCK] == toks[p]

    def admit(self, req: Request) -> None:
        computed = self.kv.get_computed_blocks(req)
        toks = req.all_token_ids
        assert len(computed) * BLOCK < req.num_tokens  # one token is always left to compute
        for i, b in enumerate(computed):
            assert self.pool.cached[b]
            assert self.content[b] == toks[i * BLOCK : (i + 1) * BLOCK], "the cache served someone else's KV"
        cached = len(computed) * BLOCK
        n = req.num_tokens - cached
        need = self.kv.blocks_for(req.num_tokens) - len(computed)
        unowned = sum(1 for b in computed if self.pool.ref_counts[b] == 0)
        feasible = need <= self.pool.num_free + self.pool.num_evictable - unowned
        refs_before = list(self.pool.ref_counts)
        ok = self.kv.allocate_slots(req, n, computed)
        assert ok == feasible
        if not ok:
            assert self.pool.ref_counts == refs_before
            assert req.request_id not in self.kv.tables
            return
        assert len(self.kv.block_table(req.request_id)) == self.kv.blocks_for(req.num_tokens)
        req.num_computed_tokens = cached
        self.write(req, cached, req.num_tokens)
        # Sample one token: its KV is computed by the next decode step.
        req.num_computed_tokens = req.num_tokens
        req.output_token_ids.append(req.num_tokens % 3)
        self.kv.cache_blocks(req, req.num_computed_tokens)
        self.running[req.request_id] = req

    # ------------------------------------------------------------------ rules

    @rule(prompt=prompt_st, use_ns=st.booleans())
    def new_request(self, prompt: list[int], use_ns: bool) -> None:
        self.n += 1
        req = Request(
            f"r{self.n}",
            prompt,
            SamplingParams(max_tokens=None),
            cache_namespace=self.alt_ns if use_ns else "",
        )
        self.admit(req)

    @precondition(lambda self: self.preempted)
    @rule(data=st.data())
    def readmit(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.preempted)))
        req = self.preempted[rid]
        self.admit(req)
        if rid in self.running:
            del self.preempted[rid]

    @precondition(lambda self: self.running)
    @rule(data=st.data(), tok=st.integers(0, 2))
    def decode(self, data: st.DataObject, tok: int) -> None:
        req = self.running[data.draw(st.sampled_from(sorted(self.running)))]
        held = len(self.kv.block_table(req.request_id))
        need = self.kv.blocks_for(req.num_computed_tokens + 1) - held
        feasible = need <= self.pool.num_free + self.pool.num_evictable
        ok = self.kv.allocate_slots(req, 1)
        assert ok == feasible
        if not ok:
            assert len(self.kv.block_table(req.request_id)) == held
            return
        self.write(req, req.num_computed_tokens, req.num_computed_tokens + 1)
        req.num_computed_tokens += 1
        req.output_token_ids.append(tok)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), k=st.integers(2, 6), keep=st.integers(1, 6))
    def reserve_and_cut(self, data: st.DataObject, k: int, keep: int) -> None:
        """A multi-step plan reserves ``k`` decode slots, then is cut to ``keep`` sub-steps before any write."""
        req = self.running[data.draw(st.sampled_from(sorted(self.running)))]
        table = self.kv.block_table(req.request_id)
        held = len(table)
        if not self.kv.allocate_slots(req, k):
            assert len(self.kv.block_table(req.request_id)) == held
            return
        assert len(table) == max(held, self.kv.blocks_for(req.num_computed_tokens + k))
        keep = min(keep, k)
        self.kv.trim(req, req.num_computed_tokens + keep)
        assert len(table) == self.kv.blocks_for(req.num_computed_tokens + keep)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def cache(self, data: st.DataObject) -> None:
        req = self.running[data.draw(st.sampled_from(sorted(self.running)))]
        self.kv.cache_blocks(req, req.num_computed_tokens)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), how=st.sampled_from(["finish", "abort", "preempt"]))
    def release(self, data: st.DataObject, how: str) -> None:
        rid = data.draw(st.sampled_from(sorted(self.running)))
        req = self.running.pop(rid)
        if how != "abort":
            self.kv.cache_blocks(req, req.num_computed_tokens)
        self.kv.free(req)
        assert self.kv.block_table(rid) == []
        if how == "preempt":
            req.num_computed_tokens = 0
            self.preempted[rid] = req

    @rule(n=st.integers(1, NUM_BLOCKS))
    def evict(self, n: int) -> None:
        if self.kv.cache is not None:
            before = self.pool.num_evictable
            assert self.kv.cache.evict(n) == min(n, before)

    # -------------------------------------------------------------- invariant

    @invariant()
    def accounting(self) -> None:
        if not hasattr(self, "kv"):
            return
        self.kv.check_invariants()
        pool = self.pool
        owned = {b for t in self.kv.tables.values() for b in t}
        cached_unowned = {b for b in range(NUM_BLOCKS) if pool.cached[b] and b not in owned}
        free = set(range(NUM_BLOCKS)) - owned - cached_unowned
        assert len(owned) == pool.num_used
        assert len(cached_unowned) == pool.num_evictable
        assert len(free) == pool.num_free
        assert pool.num_used + pool.num_evictable + pool.num_free == NUM_BLOCKS
        if self.kv.cache is None:
            assert not any(pool.cached)
        assert set(self.kv.tables) == set(self.running)
        for req in self.running.values():
            self.check_table_content(req)
        for b in range(NUM_BLOCKS):
            if pool.cached[b]:
                assert None not in self.content[b], "a partly written block is in the cache"


TestKVModel = KVModel.TestCase
TestKVModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
