"""Reference copy of the radix prefix cache as first written, with its full-tree eviction scan.

Kept only to show that the incremental eviction heap in ``tokenmill.core.prefix_cache``
evicts exactly the same blocks in the same order. Original docstring follows.

A radix tree over full KV blocks for cross-request prefix reuse (SGLang's RadixAttention).

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
    __slots__ = ("keys", "block_ids", "children", "parent", "last_access")

    def __init__(self, keys: list[BlockKey], block_ids: list[int], parent: RadixNode | None) -> None:
        self.keys = keys
        self.block_ids = block_ids
        self.children: dict[BlockKey, RadixNode] = {}
        self.parent = parent
        self.last_access = 0


class PrefixCache:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self.roots: dict[str, RadixNode] = {}
        self._tick = itertools.count(1)
        self.num_cached_blocks = 0
        self.num_evicted_blocks = 0

    def _block_keys(self, token_ids: list[int], num_blocks: int) -> list[BlockKey]:
        bs = self.block_size
        return [tuple(token_ids[i * bs : (i + 1) * bs]) for i in range(num_blocks)]

    def match(self, token_ids: list[int], namespace: str = "") -> list[int]:
        """Block ids of the longest cached full-block prefix of ``token_ids`` (not locked)."""
        node = self.roots.get(namespace)
        if node is None:
            return []
        keys = self._block_keys(token_ids, len(token_ids) // self.block_size)
        tick = next(self._tick)
        out: list[int] = []
        i = 0
        while i < len(keys):
            child = node.children.get(keys[i])
            if child is None:
                break
            child.last_access = tick
            j = 0
            ck = child.keys
            while j < len(ck) and i + j < len(keys) and ck[j] == keys[i + j]:
                j += 1
            out.extend(child.block_ids[:j])
            i += j
            if j < len(ck):
                break
            node = child
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
        keys = self._block_keys(token_ids, n)
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
                for b in new_ids:
                    self.pool.mark_cached(b)
                self.num_cached_blocks += len(new_ids)
                leaf = RadixNode(keys[i:n], new_ids, node)
                leaf.last_access = tick
                node.children[keys[i]] = leaf
                out.extend(new_ids)
                break
            j = 0
            ck = child.keys
            while j < len(ck) and i + j < n and ck[j] == keys[i + j]:
                j += 1
            if j < len(ck):
                child = self._split(child, j)
            child.last_access = tick
            out.extend(child.block_ids)
            i += j
            node = child
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
        """Free up to ``num_blocks`` unowned cached blocks, least recently used leaves first."""
        refs = self.pool.ref_counts
        heap: list[tuple[int, int, RadixNode]] = []
        uid = itertools.count()
        for root in self.roots.values():
            stack = list(root.children.values())
            while stack:
                nd = stack.pop()
                if nd.children:
                    stack.extend(nd.children.values())
                elif refs[nd.block_ids[-1]] == 0:
                    heap.append((nd.last_access, next(uid), nd))
        heapq.heapify(heap)
        freed = 0
        while freed < num_blocks and heap:
            _, _, nd = heapq.heappop(heap)
            first_key = nd.keys[0]
            while nd.block_ids and freed < num_blocks and refs[nd.block_ids[-1]] == 0:
                self.pool.uncache(nd.block_ids.pop())
                nd.keys.pop()
                freed += 1
            if nd.block_ids:
                continue
            parent = nd.parent
            assert parent is not None
            del parent.children[first_key]
            if parent.parent is not None and not parent.children and refs[parent.block_ids[-1]] == 0:
                heapq.heappush(heap, (parent.last_access, next(uid), parent))
        self.num_cached_blocks -= freed
        self.num_evicted_blocks += freed
        return freed

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

    # Adapters for the keyed calls the KV manager makes today (same semantics).
    def match_keys(self, keys: list[BlockKey], namespace: str = "") -> list[int]:
        return self.match([t for k in keys for t in k], namespace)

    def insert_keys(self, keys: list[BlockKey], block_ids: list[int], namespace: str = "") -> list[int]:
        n = min(len(keys), len(block_ids))
        return self.insert([t for k in keys[:n] for t in k], block_ids[:n], namespace)
