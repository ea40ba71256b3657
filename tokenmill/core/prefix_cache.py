"""A radix tree over full KV blocks for cross-request prefix reuse (SGLang's RadixAttention).

Edges are runs of full blocks; each block is keyed by the tuple of its tokens.
Trees are namespaced (a cache salt or adapter id), so prefixes never leak
across namespaces. The tree does not own blocks in the ref-count sense: a
request that reuses a prefix *locks* it by taking a reference on each block
of the path (``lock``/``unlock``), and the pool counts cached blocks that no
request holds as evictable. A request that holds a block of the tree always
holds every block above it (the KV manager swaps duplicate blocks for the
tree's own on insert), so unowned cached blocks are always reachable from the
leaves, and LRU eviction of unlocked leaves can free every one of them.
"""

from __future__ import annotations

import heapq
import itertools

from tokenmill.core.block_pool import BlockPool

BlockKey = tuple[int, ...]


class RadixNode:
    __slots__ = ("keys", "block_ids", "children", "parent", "last_access", "dead")

    def __init__(self, keys: list[BlockKey], block_ids: list[int], parent: RadixNode | None) -> None:
        self.keys = keys
        self.block_ids = block_ids
        self.children: dict[BlockKey, RadixNode] = {}
        self.parent = parent
        self.last_access = 0
        self.dead = False  # evicted and detached from the tree


class PrefixCache:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self.roots: dict[str, RadixNode] = {}
        self._tick = itertools.count(1)
        self.num_cached_blocks = 0
        self.num_evicted_blocks = 0
        # Leaves by (last access, push order), kept up to date incrementally so that
        # eviction does not walk the whole tree. Entries go stale when a leaf is
        # touched again (its last access changes), gains a child or is evicted;
        # stale entries are skipped when popped and dropped when the heap is rebuilt.
        # Every leaf has a fresh entry, so the pop order is the LRU order of leaves
        # (last-access ticks are unique among leaves: a tick touches one path).
        self._leaves: list[tuple[int, int, RadixNode]] = []
        self._uid = itertools.count()

    def _push_leaf(self, node: RadixNode) -> None:
        heapq.heappush(self._leaves, (node.last_access, next(self._uid), node))
        if len(self._leaves) > 2 * self.num_cached_blocks + 4096:
            self._compact()

    def _block_keys(self, token_ids: list[int], num_blocks: int) -> list[BlockKey]:
        bs = self.block_size
        # zip over one iterator taken bs at a time cuts the tuples in C.
        it = iter(token_ids[: num_blocks * bs])
        return list(zip(*([it] * bs), strict=True)) if bs > 1 else [(t,) for t in it]

    def match(self, token_ids: list[int], namespace: str = "") -> list[int]:
        """Block ids of the longest cached full-block prefix of ``token_ids`` (not locked)."""
        if namespace not in self.roots:
            return []
        return self.match_keys(self._block_keys(token_ids, len(token_ids) // self.block_size), namespace)

    def match_keys(self, keys: list[BlockKey], namespace: str = "") -> list[int]:
        """``match`` for block keys already cut (the KV manager keeps each request's)."""
        node = self.roots.get(namespace)
        if node is None:
            return []
        tick = next(self._tick)
        out: list[int] = []
        i = 0
        last: RadixNode | None = None
        while i < len(keys):
            child = node.children.get(keys[i])
            if child is None:
                break
            child.last_access = tick
            last = child
            ck = child.keys
            j = len(ck)
            if keys[i : i + j] != ck:  # one C-level comparison when the whole edge matches
                j = 0
                while j < len(ck) and i + j < len(keys) and ck[j] == keys[i + j]:
                    j += 1
            out.extend(child.block_ids[:j])
            i += j
            if j < len(ck):
                break
            node = child
        if last is not None and not last.children:
            self._push_leaf(last)
        return out

    def insert(self, token_ids: list[int], block_ids: list[int], namespace: str = "") -> list[int]:
        """Insert the full blocks of ``token_ids`` (KV in ``block_ids``, owned by the caller).

        Returns the tree's block ids for that prefix: where the tree already
        had a block for the same tokens, its id replaces the caller's, and the
        caller should swap its own duplicate for it.
        """
        n = min(len(token_ids) // self.block_size, len(block_ids))
        if n == 0:
            return []
        return self.insert_keys(self._block_keys(token_ids, n), block_ids, namespace)

    def insert_keys(self, keys: list[BlockKey], block_ids: list[int], namespace: str = "") -> list[int]:
        """``insert`` for block keys already cut: the first ``min(len(keys), len(block_ids))`` blocks."""
        n = min(len(keys), len(block_ids))
        if n == 0:
            return []
        node = self.roots.get(namespace)
        if node is None:
            node = self.roots[namespace] = RadixNode([], [], None)
        tick = next(self._tick)
        out: list[int] = []
        i = 0
        while i < n:
            child = node.children.get(keys[i])
            if child is None:
                new_ids = list(block_ids[i:n])
                self.pool.mark_cached_many(new_ids)
                self.num_cached_blocks += len(new_ids)
                leaf = RadixNode(keys[i:n], new_ids, node)
                leaf.last_access = tick
                node.children[keys[i]] = leaf
                self._push_leaf(leaf)
                out.extend(new_ids)
                break
            ck = child.keys
            j = len(ck)
            if i + j > n or keys[i : i + j] != ck:  # one C-level comparison when the whole edge matches
                j = 0
                while j < len(ck) and i + j < n and ck[j] == keys[i + j]:
                    j += 1
            if j < len(ck):
                child = self._split(child, j)
            child.last_access = tick
            out.extend(child.block_ids)
            i += j
            node = child
        if i == n and not node.children and node.parent is not None:
            self._push_leaf(node)  # the insert ended on an existing leaf: its last access changed
        return out

    def _split(self, node: RadixNode, j: int) -> RadixNode:
        """Cut ``node`` after its first ``j`` blocks; return the new upper part."""
        parent = node.parent
        assert parent is not None
        top = RadixNode(node.keys[:j], node.block_ids[:j], parent)
        top.last_access = node.last_access
        parent.children[node.keys[0]] = top
        node.keys = node.keys[j:]
        node.block_ids = node.block_ids[j:]
        node.parent = top
        top.children[node.keys[0]] = node
        return top

    def lock(self, block_ids: list[int]) -> None:
        """Take a reference on each block of a matched path, protecting it from eviction."""
        self.pool.incref(block_ids)

    def unlock(self, block_ids: list[int]) -> None:
        self.pool.decref(block_ids)

    def evict(self, num_blocks: int) -> int:
        """Free up to ``num_blocks`` unowned cached blocks, least recently used leaves first.

        A leaf whose last block is owned is not evictable now; it is set
        aside and goes back into the heap afterwards (it may be released later).
        """
        refs = self.pool.ref_counts
        heap = self._leaves
        pop, push = heapq.heappop, heapq.heappush
        aside: list[tuple[int, int, RadixNode]] = []
        freed = 0
        while freed < num_blocks and heap:
            entry = pop(heap)
            la, _, nd = entry
            if nd.dead or nd.children or nd.last_access != la:
                continue  # stale
            if refs[nd.block_ids[-1]] != 0:
                aside.append(entry)
                continue
            first_key = nd.keys[0]
            # Free the leaf's unowned tail, last block first, up to what is still wanted.
            ids = nd.block_ids
            n = len(ids)
            limit = min(n, num_blocks - freed)
            m = 0
            while m < limit and refs[ids[n - 1 - m]] == 0:
                m += 1
            if m:
                gone = ids[n - m :]
                gone.reverse()
                del ids[n - m :]
                del nd.keys[n - m :]
                self.pool.uncache_many(gone)
                freed += m
            if ids:
                aside.append(entry)  # still a leaf (its head is owned, or we have freed enough)
                continue
            nd.dead = True
            parent = nd.parent
            assert parent is not None
            del parent.children[first_key]
            if parent.parent is not None and not parent.children:
                push(heap, (parent.last_access, next(self._uid), parent))
        for entry in aside:
            push(heap, entry)
        self.num_cached_blocks -= freed
        self.num_evicted_blocks += freed
        return freed

    def _compact(self) -> None:
        """Drop stale leaf entries."""
        live = [e for e in self._leaves if not e[2].dead and not e[2].children and e[2].last_access == e[0]]
        heapq.heapify(live)
        self._leaves = live

    def cached_prefixes(self) -> dict[str, list[tuple[list[BlockKey], list[int]]]]:
        """Every root-to-node path as (keys, block ids), for tests and debugging."""
        out: dict[str, list[tuple[list[BlockKey], list[int]]]] = {}
        for ns, root in self.roots.items():
            paths: list[tuple[list[BlockKey], list[int]]] = []
            stack = [(c, [], []) for c in root.children.values()]
            while stack:
                nd, keys, ids = stack.pop()
                keys, ids = keys + nd.keys, ids + nd.block_ids
                paths.append((keys, ids))
                stack.extend((c, keys, ids) for c in nd.children.values())
            out[ns] = paths
        return out
