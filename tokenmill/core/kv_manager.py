"""Per-request block tables on top of the block pool and the prefix cache.

The API is small and never raises for lack of memory: ``allocate_slots``
returns ``False`` and changes nothing when the blocks are not there, and the
scheduler decides whom to preempt.
"""

from __future__ import annotations

from itertools import groupby, islice, repeat

from tokenmill.core.block_pool import BlockPool
from tokenmill.core.prefix_cache import PrefixCache
from tokenmill.core.request import Request


class KVManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.cache = PrefixCache(self.pool, block_size) if enable_prefix_caching else None
        self.tables: dict[str, list[int]] = {}
        # Per request: how many leading entries of its table the executor already holds
        # (sent in earlier plans and unchanged since), so a plan sends only the rest.
        self._synced: dict[str, int] = {}
        # KV moving between replicas (prefill/decode disaggregation): tables of finished
        # requests held for export, and tables reserved for requests whose KV is imported.
        self.held: dict[str, list[int]] = {}
        self.imports: dict[str, tuple[list[int], int]] = {}  # request id -> (table, tokens imported)
        # Each live request's block keys (token tuples of its full blocks), cut once:
        # a request's tokens only grow, so its keys only grow too.
        self._keys: dict[str, list[tuple[int, ...]]] = {}
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_available(self) -> int:
        """Blocks that an allocation could get now: free plus evictable cached."""
        return self.pool.num_free + self.pool.num_evictable

    @property
    def usage(self) -> float:
        """Fraction of blocks owned by requests (cached-but-unowned blocks count as free)."""
        return self.pool.num_used / self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    def _block_keys(self, req: Request, num_blocks: int) -> list[tuple[int, ...]]:
        """The request's first ``num_blocks`` block keys (cut on first use, then reused)."""
        keys = self._keys.get(req.request_id)
        if keys is None:
            keys = self._keys[req.request_id] = []
        have = len(keys)
        if have < num_blocks:
            bs = self.block_size
            start, stop = have * bs, num_blocks * bs
            prompt = req.prompt_token_ids
            # zip over one iterator taken bs at a time cuts the tuples in C. The first cut
            # reads the prompt in place; later ones (a few blocks each) copy just their
            # tokens, as islice would step through every token before ``start``.
            it = islice(prompt, stop) if start == 0 and stop <= len(prompt) else iter(req.token_ids_slice(start, stop))
            # Equal neighbouring blocks (a run of padding or repeated text) share one key
            # object: the prefix cache keeps a key per cached block, a tuple of bs tokens each.
            for key, run in groupby(zip(*([it] * bs), strict=True)):
                keys.extend(repeat(key, len(list(run))))
            return keys
        return keys if have == num_blocks else keys[:num_blocks]

    def get_computed_blocks(self, req: Request) -> list[int]:
        """Cached blocks holding a prefix of the request's tokens (not yet owned).

        At least one token is always left to compute, so the step that admits
        the request can sample from it.
        """
        if self.cache is None:
            return []
        max_blocks = (req.num_tokens - 1) // self.block_size
        if max_blocks == 0:
            return []
        if req.cache_namespace not in self.cache.roots:
            return []
        return self.cache.match_keys(self._block_keys(req, max_blocks), req.cache_namespace)

    def record_prefix_query(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        if self.cache is None:
            return  # no cache, no lookup: the counters stay at zero (as vLLM's do)
        self.prefix_query_tokens += num_prompt_tokens
        self.prefix_hit_tokens += num_hit_tokens

    def allocate_slots(self, req: Request, num_new_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        """Make the request's table cover ``num_computed_tokens`` (+ the computed blocks) + ``num_new_tokens``.

        ``computed_blocks`` (from ``get_computed_blocks``) are taken into the
        table first, at admission. Returns False, changing nothing, when the
        pool cannot supply the blocks even after evicting cached ones.
        """
        computed = computed_blocks or []
        table = self.tables.get(req.request_id)
        held = len(table) if table is not None else 0
        num_tokens = req.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        need = -(-num_tokens // self.block_size) - held - len(computed)
        if need <= 0 and not computed:
            return True
        pool = self.pool
        # Computed blocks that nobody owns are counted as evictable; taking them
        # removes them from what eviction could free.
        unowned_computed = sum(1 for b in computed if pool.ref_counts[b] == 0) if computed else 0
        if need > pool.num_free + pool.num_evictable - unowned_computed:
            return False
        if table is None:
            table = self.tables[req.request_id] = []
        if computed:
            pool.incref(computed)
            table.extend(computed)
        if need > 0:
            short = need - pool.num_free
            if short > 0:
                assert self.cache is not None
                self.cache.evict(short)
            table.extend(pool.pop_free(need))
        return True

    def cache_blocks(self, req: Request, num_tokens: int) -> None:
        """Put the full blocks among the request's first ``num_tokens`` tokens into the prefix cache."""
        if self.cache is None:
            return
        table = self.tables.get(req.request_id)
        if not table:
            return
        n_full = min(num_tokens // self.block_size, len(table))
        if n_full == 0:
            return
        tree_ids = self.cache.insert_keys(self._block_keys(req, n_full), table, req.cache_namespace)
        if tree_ids == table[:n_full]:
            return
        # Where the tree already held these tokens, use its blocks and let our
        # duplicates go, so that holding a cached block implies holding its ancestors.
        for i, b in enumerate(tree_ids):
            if table[i] != b:
                self.pool.incref([b])
                self.pool.decref([table[i]])
                table[i] = b
                self._unsync(req.request_id, i)

    def trim(self, req: Request, num_tokens: int) -> None:
        """Give back the tail blocks of the request's table beyond what ``num_tokens`` tokens need.

        Only for blocks reserved ahead and never written (the sub-steps of a
        cut multi-step plan): they return to the front of the free list.
        """
        table = self.tables.get(req.request_id)
        if not table:
            return
        keep = self.blocks_for(num_tokens)
        if keep >= len(table):
            return
        extra = table[keep:]
        del table[keep:]
        self.pool.unpop(extra)
        self._unsync(req.request_id, keep)

    def _unsync(self, request_id: str, index: int) -> None:
        synced = self._synced.get(request_id)
        if synced is not None and index < synced:
            self._synced[request_id] = index

    def table_diff(self, request_id: str) -> tuple[int, list[int]]:
        """``(offset, blocks)``: what a plan sends of the request's table; marks it sent.

        The executor's copy, replaced from ``offset`` on by ``blocks``, equals
        the table: the whole of it the first time, then only what was appended
        or changed since the last call.
        """
        table = self.tables.get(request_id, [])
        offset = self._synced.get(request_id, 0)
        self._synced[request_id] = len(table)
        return offset, table[offset:]

    def free(self, req: Request) -> None:
        """Drop the request's blocks, tail first (so its tail is reused or evicted first)."""
        self._keys.pop(req.request_id, None)
        self._synced.pop(req.request_id, None)
        table = self.tables.pop(req.request_id, None)
        if table:
            self.pool.decref(table[::-1])

    # ---------------------------------------------------- KV export and import

    def hold(self, req: Request) -> None:
        """Keep a finishing request's blocks owned, for export, until ``release``."""
        self._keys.pop(req.request_id, None)
        self._synced.pop(req.request_id, None)
        table = self.tables.pop(req.request_id, None)
        if table:
            self.held[req.request_id] = table

    def export_blocks(self, request_id: str, start_token: int, end_token: int) -> list[int]:
        """The blocks that hold tokens ``[start_token, end_token)`` of a held (or running) request.

        ``start_token`` is a multiple of the block size (what an importer
        already has is whole blocks); the last block may be partly filled.
        """
        if start_token % self.block_size:
            raise ValueError(f"an export starts at a block boundary, not token {start_token}")
        table = self.held.get(request_id) or self.tables.get(request_id)
        if table is None:
            raise KeyError(f"request {request_id!r} holds no blocks to export")
        end = self.blocks_for(end_token)
        if end > len(table):
            raise ValueError(f"request {request_id!r} holds {len(table)} blocks, not the {end} that {end_token} tokens need")
        return table[start_token // self.block_size : end]

    def release(self, request_id: str) -> bool:
        """Give back a held request's blocks (full ones stay in the prefix cache); False if none."""
        table = self.held.pop(request_id, None)
        if table is None:
            return False
        self.pool.decref(table[::-1])
        return True

    def reserve_import(self, req: Request, num_tokens: int) -> tuple[int, list[int]] | None:
        """Reserve the blocks that will hold the request's first ``num_tokens`` tokens of KV.

        Full blocks the prefix cache already holds are taken from it (no need to
        transfer them, as in Mooncake); the rest are fresh. Returns (tokens found
        in the cache, the fresh blocks to write tokens from there up to
        ``num_tokens`` into), or None when the pool cannot supply them. The
        reservation is the request's table once it is admitted (``take_import``).
        """
        if req.request_id in self.imports or req.request_id in self.tables:
            raise ValueError(f"request {req.request_id!r} already holds blocks")
        if not 0 < num_tokens <= req.num_tokens:
            raise ValueError(f"cannot import {num_tokens} tokens of a {req.num_tokens}-token request")
        computed: list[int] = []
        if self.cache is not None and req.cache_namespace in self.cache.roots:
            n_full = num_tokens // self.block_size
            if n_full:
                computed = self.cache.match_keys(self._block_keys(req, n_full), req.cache_namespace)
        need = self.blocks_for(num_tokens) - len(computed)
        pool = self.pool
        unowned_computed = sum(1 for b in computed if pool.ref_counts[b] == 0)
        if need > pool.num_free + pool.num_evictable - unowned_computed:
            return None
        if computed:
            pool.incref(computed)
        if need > pool.num_free:
            assert self.cache is not None
            self.cache.evict(need - pool.num_free)
        fresh = pool.pop_free(need)
        self.imports[req.request_id] = (computed + fresh, num_tokens)
        return len(computed) * self.block_size, fresh

    def take_import(self, req: Request) -> int | None:
        """Make the request's import reservation its table; returns the tokens imported (None: none).

        The imported full blocks go into the prefix cache at once, for later requests."""
        entry = self.imports.pop(req.request_id, None)
        if entry is None:
            return None
        table, num_tokens = entry
        self.tables[req.request_id] = table
        self.cache_blocks(req, num_tokens)
        return num_tokens

    def cancel_import(self, request_id: str) -> bool:
        """Drop an import reservation that will not be admitted; False if there is none."""
        entry = self.imports.pop(request_id, None)
        if entry is None:
            return False
        self.pool.decref(entry[0][::-1])
        return True

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        owners = [0] * self.pool.num_blocks
        for table in [*self.tables.values(), *self.held.values(), *(t for t, _ in self.imports.values())]:
            for b in table:
                owners[b] += 1
        if owners != self.pool.ref_counts:
            raise AssertionError("block ref counts disagree with the block tables")
