"""Fixed-size KV blocks: reference counts and the free list.

The pool deals in block ids only, never tensors. A block is in exactly one of
three states:

- **free**: ref count 0 and not in the prefix cache; it sits in the free list;
- **owned**: ref count > 0 (one count per request whose block table holds it);
- **cached**: ref count 0 but kept by the prefix cache for reuse; evictable.

The prefix cache marks blocks as cached; the pool keeps a running count of
cached blocks with no owners, so "how many blocks could I get" is O(1).
"""

from __future__ import annotations


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.cached = [False] * num_blocks
        # Freed blocks go to the back; allocation takes from the front, so the
        # most recently freed block is reused last. The queue is a list read from
        # ``_head`` on, so that taking n blocks is one slice rather than n pops.
        self._free: list[int] = list(range(num_blocks))
        self._head = 0
        self.num_evictable = 0  # cached blocks with ref count 0

    @property
    def num_free(self) -> int:
        return len(self._free) - self._head

    @property
    def num_used(self) -> int:
        """Blocks owned by at least one request."""
        return self.num_blocks - (len(self._free) - self._head) - self.num_evictable

    def free_ids(self) -> list[int]:
        """The free blocks, in the order they will be handed out."""
        return self._free[self._head :]

    def pop_free(self, n: int) -> list[int]:
        """Take ``n`` free blocks, each with ref count 1. The caller checked ``num_free``."""
        free, head = self._free, self._head
        if n > len(free) - head:
            raise RuntimeError(f"asked for {n} free blocks, {len(free) - head} free")
        ids = free[head : head + n]
        head += n
        if head > 4096 and 2 * head > len(free):
            del free[:head]  # drop the consumed front now and then (amortised O(1))
            head = 0
        self._head = head
        refs = self.ref_counts
        for b in ids:
            refs[b] = 1
        return ids

    def unpop(self, block_ids: list[int]) -> None:
        """Undo ``pop_free``: blocks just taken (ref count 1, uncached) go back to the front, in order.

        Used to give back blocks reserved for sub-steps of a plan that were
        cut: they were never written, so they are handed out first again.
        """
        refs, cached, free = self.ref_counts, self.cached, self._free
        for b in block_ids:
            if refs[b] != 1 or cached[b]:
                raise RuntimeError(f"block {b} is shared or cached; only a fresh reservation can be undone")
            refs[b] = 0
        k = len(block_ids)
        if self._head >= k:
            self._head -= k
            free[self._head : self._head + k] = block_ids
        else:
            free[self._head : self._head] = block_ids

    def incref(self, block_ids: list[int]) -> None:
        refs, cached = self.ref_counts, self.cached
        for b in block_ids:
            if refs[b] == 0:
                if not cached[b]:
                    raise RuntimeError(f"block {b} is free; it cannot gain an owner by incref")
                self.num_evictable -= 1
            refs[b] += 1

    def decref(self, block_ids: list[int]) -> None:
        """Drop one owner from each block; unowned blocks go free or stay cached."""
        refs, cached, free = self.ref_counts, self.cached, self._free.append
        evictable = 0
        for b in block_ids:
            r = refs[b] - 1
            if r < 0:
                self.num_evictable += evictable
                raise RuntimeError(f"block {b} freed more often than it was owned")
            refs[b] = r
            if r == 0:
                if cached[b]:
                    evictable += 1
                else:
                    free(b)
        self.num_evictable += evictable

    def mark_cached(self, block_id: int) -> None:
        """The prefix cache now keeps this (owned) block."""
        if self.cached[block_id]:
            raise RuntimeError(f"block {block_id} is cached already")
        if self.ref_counts[block_id] == 0:
            raise RuntimeError(f"block {block_id} must be owned when it enters the cache")
        self.cached[block_id] = True

    def mark_cached_many(self, block_ids: list[int]) -> None:
        """``mark_cached`` for each block (one call for a whole new leaf of the tree)."""
        cached, refs = self.cached, self.ref_counts
        for b in block_ids:
            if cached[b]:
                raise RuntimeError(f"block {b} is cached already")
            if refs[b] == 0:
                raise RuntimeError(f"block {b} must be owned when it enters the cache")
            cached[b] = True

    def uncache(self, block_id: int) -> None:
        """The prefix cache lets go of an unowned block (eviction): it becomes free."""
        if not self.cached[block_id] or self.ref_counts[block_id] != 0:
            raise RuntimeError(f"block {block_id} is not an evictable cached block")
        self.cached[block_id] = False
        self.num_evictable -= 1
        self._free.append(block_id)

    def uncache_many(self, block_ids: list[int]) -> None:
        """``uncache`` each block, in order (one call for a leaf's evicted tail)."""
        cached, refs = self.cached, self.ref_counts
        for b in block_ids:
            if not cached[b] or refs[b] != 0:
                raise RuntimeError(f"block {b} is not an evictable cached block")
            cached[b] = False
        self.num_evictable -= len(block_ids)
        self._free.extend(block_ids)

    def check_invariants(self) -> None:
        """Every block in exactly one state; counts add up to the pool size."""
        free_list = self.free_ids()
        free_set = set(free_list)
        if len(free_set) != len(free_list):
            raise AssertionError("a block is in the free list twice")
        n_owned = n_evictable = 0
        for b in range(self.num_blocks):
            in_free = b in free_set
            if self.ref_counts[b] > 0:
                n_owned += 1
                if in_free:
                    raise AssertionError(f"block {b} is owned and free")
            elif self.cached[b]:
                n_evictable += 1
                if in_free:
                    raise AssertionError(f"block {b} is cached and free")
            elif not in_free:
                raise AssertionError(f"block {b} is lost: unowned, uncached, not free")
        if n_evictable != self.num_evictable:
            raise AssertionError(f"evictable count {self.num_evictable} != {n_evictable}")
        if n_owned + n_evictable + len(free_set) != self.num_blocks:
            raise AssertionError("block counts do not add up to the pool size")
