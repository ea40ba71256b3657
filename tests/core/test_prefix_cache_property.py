"""Property test: the radix prefix cache against a brute-force model.

The model keeps, per namespace, a dict from every cached full-block prefix
(a tuple of block keys) to the block id holding its last block, and a lock
count per block. The cache runs on a real ``BlockPool`` and is driven the
way the KV manager drives it: a request matches, locks what it matched,
allocates fresh blocks for the rest (evicting when the pool is short),
inserts, swaps its duplicates for the tree's blocks, and later unlocks.

Checked after every operation: matches agree with the model (the longest
full-block prefix among inserted, not-evicted sequences, with the same block
ids); eviction frees exactly ``min(n, evictable)`` blocks, never a locked
one, and leaves the cached set prefix-closed; the pool's accounting holds.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tokenmill.core.block_pool import BlockPool
from tokenmill.core.prefix_cache import PrefixCache

BLOCK = 2
NUM_BLOCKS = 12
NAMESPACES = ["", "salt"]

# A tiny alphabet and short sequences make shared prefixes, splits and
# divergences common.
tokens_st = st.lists(st.integers(0, 1), min_size=0, max_size=5 * BLOCK + 1)
ns_st = st.sampled_from(NAMESPACES)

Path = tuple[tuple[int, ...], ...]


def block_keys(tokens: list[int]) -> Path:
    n = len(tokens) // BLOCK
    return tuple(tuple(tokens[i * BLOCK : (i + 1) * BLOCK]) for i in range(n))


class RadixModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(NUM_BLOCKS)
        self.cache = PrefixCache(self.pool, BLOCK)
        self.paths: dict[str, dict[Path, int]] = {ns: {} for ns in NAMESPACES}
        self.locks = [0] * NUM_BLOCKS  # model of the pool's ref counts
        self.held: list[list[int]] = []  # locked paths, as block-id lists

    # ------------------------------------------------------------ model side

    def model_match(self, ns: str, tokens: list[int]) -> list[int]:
        keys = block_keys(tokens)
        out = []
        for i in range(1, len(keys) + 1):
            b = self.paths[ns].get(keys[:i])
            if b is None:
                break
            out.append(b)
        return out

    def model_cached_blocks(self) -> set[int]:
        return {b for d in self.paths.values() for b in d.values()}

    def model_evictable(self) -> int:
        return sum(1 for b in self.model_cached_blocks() if self.locks[b] == 0)

    # ----------------------------------------------------------------- rules

    @rule(ns=ns_st, tokens=tokens_st)
    def match(self, ns: str, tokens: list[int]) -> None:
        assert self.cache.match(tokens, ns) == self.model_match(ns, tokens)

    @rule(ns=ns_st, tokens=tokens_st, keep=st.booleans())
    def insert(self, ns: str, tokens: list[int], keep: bool) -> None:
        """A request with these tokens computes its KV and enters the tree."""
        keys = block_keys(tokens)
        matched = self.cache.match(tokens, ns)
        assert matched == self.model_match(ns, tokens)
        need = len(keys) - len(matched)
        unowned_matched = sum(1 for b in matched if self.locks[b] == 0)
        if need > self.pool.num_free + self.pool.num_evictable - unowned_matched:
            return  # the pool cannot hold this request now
        self.cache.lock(matched)
        for b in matched:
            self.locks[b] += 1
        short = need - self.pool.num_free
        if short > 0:
            self.evict_and_check(short, expect_exact=True)
        fresh = self.pool.pop_free(need)
        for b in fresh:
            assert b not in self.model_cached_blocks(), "a cached block was handed out as free"
            self.locks[b] += 1
        table = matched + fresh
        tree_ids = self.cache.insert(tokens, table, ns)
        assert len(tree_ids) == len(keys)
        # Model: existing prefixes keep their block; new ones take the caller's.
        for i in range(len(keys)):
            self.paths[ns].setdefault(keys[: i + 1], table[i])
            assert tree_ids[i] == self.paths[ns][keys[: i + 1]]
        # Swap duplicates for the tree's blocks, as the KV manager does.
        for i, b in enumerate(tree_ids):
            if table[i] != b:
                self.pool.incref([b])
                self.pool.decref([table[i]])
                self.locks[b] += 1
                self.locks[table[i]] -= 1
                table[i] = b
        if keep:
            self.held.append(table)
        else:
            self.release(table)

    @rule(ns=ns_st, tokens=tokens_st)
    def lock(self, ns: str, tokens: list[int]) -> None:
        matched = self.cache.match(tokens, ns)
        assert matched == self.model_match(ns, tokens)
        if matched:
            self.cache.lock(matched)
            for b in matched:
                self.locks[b] += 1
            self.held.append(matched)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.held) - 1))
        self.release(self.held.pop(i))

    @rule(n=st.integers(0, NUM_BLOCKS))
    def evict(self, n: int) -> None:
        self.evict_and_check(n, expect_exact=False)

    # --------------------------------------------------------------- helpers

    def release(self, table: list[int]) -> None:
        self.cache.unlock(table[::-1])
        for b in table:
            self.locks[b] -= 1

    def evict_and_check(self, n: int, expect_exact: bool) -> None:
        before = {ns: dict(d) for ns, d in self.paths.items()}
        evictable = self.model_evictable()
        if expect_exact:
            assert evictable >= n
        freed = self.cache.evict(n)
        assert freed == min(n, evictable)
        gone: set[int] = set()
        for ns, d in before.items():
            for path, b in d.items():
                if not self.pool.cached[b]:
                    assert self.locks[b] == 0, f"locked block {b} was evicted"
                    gone.add(b)
                    del self.paths[ns][path]
        assert len(gone) == freed
        # What is left is prefix-closed: eviction took leaves, never a middle block.
        for d in self.paths.values():
            for path in d:
                assert path[:-1] == () or path[:-1] in d

    @invariant()
    def accounting(self) -> None:
        self.pool.check_invariants()
        assert self.pool.ref_counts == self.locks
        cached = self.model_cached_blocks()
        assert {b for b in range(NUM_BLOCKS) if self.pool.cached[b]} == cached
        assert self.cache.num_cached_blocks == len(cached)
        assert self.pool.num_evictable == self.model_evictable()
        # Every cached path the model knows is what the tree reports.
        tree = {
            (ns, tuple(keys)): ids for ns, paths in self.cache.cached_prefixes().items() for keys, ids in paths
        }
        for ns, d in self.paths.items():
            for path, b in d.items():
                if (ns, path) in tree:
                    assert tree[(ns, path)][-1] == b


TestRadixModel = RadixModel.TestCase
TestRadixModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
