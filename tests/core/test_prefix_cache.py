"""Focused tests of the radix prefix cache: splits, namespaces, LRU eviction, lazy eviction."""

from __future__ import annotations

from tokenmill.core.block_pool import BlockPool
from tokenmill.core.kv_manager import KVManager
from tokenmill.core.prefix_cache import PrefixCache
from tokenmill.core.request import Request, SamplingParams

BS = 2


def fresh(num_blocks: int = 16) -> tuple[BlockPool, PrefixCache]:
    pool = BlockPool(num_blocks)
    return pool, PrefixCache(pool, BS)


def put(pool: BlockPool, cache: PrefixCache, tokens: list[int], ns: str = "") -> list[int]:
    """Insert ``tokens`` as a finished request would: own fresh blocks, insert, swap, release."""
    n = len(tokens) // BS
    matched = cache.match(tokens, ns)
    cache.lock(matched)
    table = matched + pool.pop_free(n - len(matched))
    tree = cache.insert(tokens, table, ns)
    for i, b in enumerate(tree):
        if table[i] != b:
            pool.incref([b])
            pool.decref([table[i]])
            table[i] = b
    pool.decref(table[::-1])
    pool.check_invariants()
    return tree


def test_match_is_full_blocks_only() -> None:
    pool, cache = fresh()
    ids = put(pool, cache, [1, 2, 3, 4, 5])  # the trailing 5 is a partial block: not cached
    assert len(ids) == 2
    assert cache.match([1, 2, 3, 4, 5, 6]) == ids
    assert cache.match([1, 2, 3]) == ids[:1]
    assert cache.match([1, 9]) == []
    assert cache.match([1]) == []


def test_node_split_where_a_match_diverges() -> None:
    pool, cache = fresh()
    a = put(pool, cache, [1, 1, 2, 2, 3, 3])
    # One node holds all three blocks.
    assert len(cache.roots[""].children) == 1
    b = put(pool, cache, [1, 1, 2, 2, 4, 4])
    assert b[:2] == a[:2] and b[2] != a[2]
    root = cache.roots[""]
    (top,) = root.children.values()
    assert top.block_ids == a[:2]  # the shared part became its own node...
    assert {tuple(c.block_ids) for c in top.children.values()} == {(a[2],), (b[2],)}  # ...with two leaves
    assert all(c.parent is top for c in top.children.values())
    assert cache.match([1, 1, 2, 2, 3, 3]) == a
    assert cache.match([1, 1, 2, 2, 4, 4]) == b
    assert cache.num_cached_blocks == 4
    # A shorter insert splits again without copying a block.
    c = put(pool, cache, [1, 1, 7, 7])
    assert c[0] == a[0] and cache.num_cached_blocks == 5
    assert cache.match([1, 1, 2, 2, 3, 3]) == a


def test_insert_returns_the_trees_blocks_for_duplicates() -> None:
    pool, cache = fresh()
    a = put(pool, cache, [1, 1, 2, 2])
    mine = pool.pop_free(3)
    tree = cache.insert([1, 1, 2, 2, 3, 3], mine)
    assert tree == [a[0], a[1], mine[2]]  # the caller swaps its first two for the tree's


def test_namespaces_are_isolated() -> None:
    pool, cache = fresh()
    plain = put(pool, cache, [1, 2, 3, 4])
    assert cache.match([1, 2, 3, 4], "adapter-a") == []
    salted = put(pool, cache, [1, 2, 3, 4], "adapter-a")
    assert set(salted).isdisjoint(plain)
    assert cache.match([1, 2, 3, 4]) == plain
    assert cache.match([1, 2, 3, 4], "adapter-a") == salted
    assert cache.match([1, 2, 3, 4], "adapter-b") == []


def test_eviction_is_lru_over_leaves() -> None:
    pool, cache = fresh()
    old = put(pool, cache, [1, 1, 2, 2])
    mid = put(pool, cache, [3, 3, 4, 4])
    new = put(pool, cache, [5, 5, 6, 6])
    cache.match([1, 1, 2, 2])  # touching the oldest makes "mid" the least recently used
    assert cache.evict(2) == 2
    assert cache.match([3, 3, 4, 4]) == []
    assert cache.match([1, 1, 2, 2]) == old and cache.match([5, 5, 6, 6]) == new
    assert not pool.cached[mid[0]] and not pool.cached[mid[1]]
    # The matches just above touched "old" before "new"; a leaf is taken from its tail.
    assert cache.evict(1) == 1
    assert cache.match([1, 1, 2, 2]) == old[:1]
    assert cache.match([5, 5, 6, 6]) == new
    pool.check_invariants()


def test_a_parent_is_evicted_only_after_its_children() -> None:
    pool, cache = fresh()
    a = put(pool, cache, [1, 1, 2, 2])
    b = put(pool, cache, [1, 1, 3, 3])
    cache.match([1, 1])  # the shared parent is the most recently used node, but it is not a leaf
    assert cache.evict(2) == 2
    assert pool.cached[a[0]] and not pool.cached[a[1]] and not pool.cached[b[1]]
    assert cache.evict(5) == 1
    assert cache.roots[""].children == {}
    assert cache.num_cached_blocks == 0 and cache.num_evicted_blocks == 3


def test_locked_blocks_are_never_evicted() -> None:
    pool, cache = fresh()
    a = put(pool, cache, [1, 1, 2, 2, 3, 3])
    held = cache.match([1, 1, 2, 2])
    cache.lock(held)
    assert cache.evict(10) == 1  # only the unlocked tail block
    assert cache.match([1, 1, 2, 2, 3, 3]) == a[:2]
    cache.unlock(held)
    assert cache.evict(10) == 2
    pool.check_invariants()


def req(rid: str, prompt: list[int]) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=4))


def test_eviction_happens_only_when_the_pool_needs_blocks() -> None:
    kv = KVManager(num_blocks=6, block_size=BS)
    a = req("a", [1, 1, 2, 2, 3])
    assert kv.allocate_slots(a, 5)
    kv.cache_blocks(a, 4)
    kv.free(a)  # two full blocks stay cached, one goes free
    assert kv.pool.num_evictable == 2 and kv.pool.num_free == 4
    b = req("b", [7, 7, 8, 8, 9, 9, 5])
    assert kv.allocate_slots(b, 7)  # needs 4: the free ones suffice, nothing is evicted
    assert kv.cache.num_evicted_blocks == 0
    assert kv.get_computed_blocks(req("a2", [1, 1, 2, 2, 3])) != []
    c = req("c", [4, 4, 5])
    assert kv.allocate_slots(c, 3)  # needs 2, none free: exactly two cached blocks go
    assert kv.cache.num_evicted_blocks == 2
    assert kv.get_computed_blocks(req("a3", [1, 1, 2, 2, 3])) == []
    assert not kv.allocate_slots(req("d", [6]), 1)  # nothing left: refused, nothing changes
    kv.check_invariants()


def test_allocation_counts_matched_blocks_it_takes_out_of_the_evictable_pool() -> None:
    kv = KVManager(num_blocks=3, block_size=BS)
    a = req("a", [1, 1, 2, 2, 3])
    assert kv.allocate_slots(a, 5)
    kv.cache_blocks(a, 4)
    kv.free(a)  # 2 cached-evictable, 1 free
    again = req("b", [1, 1, 2, 2, 3, 3, 4])
    computed = kv.get_computed_blocks(again)
    assert len(computed) == 2
    # It would need 2 more blocks; only 1 is free and the 2 evictable ones are the ones it reuses.
    assert not kv.allocate_slots(again, 3, computed)
    kv.check_invariants()
    assert kv.allocate_slots(req("c", [1, 1, 2, 2, 3]), 1, computed)
    assert kv.cache.num_evicted_blocks == 0
    kv.check_invariants()
