"""Per-request block tables on top of the block pool and the prefix cache.

The API is small and never raises for lack of memory: ``allocate_slots``
returns ``False`` and changes nothing when the blocks are not there, and the
scheduler decides whom to preempt.

Sliding windows (Jenga's observation for models whose layers see only recent
keys): when every layer of the model attends within a window of at most ``w``
keys, a block all of whose tokens lie before ``p - w + 1`` for the next query
position ``p`` is never read again. ``free_outside_window`` gives such blocks
back (tail of the free list) and leaves ``NULL_BLOCK`` in their table entries,
so a table stays indexed by position (token ``t`` in entry ``t // block_size``)
and executors learn of the change through the usual table diff. A model with
any full-attention layer keeps every block.

KV eviction (``kv_eviction.py``): a request with a budget of ``B`` entries
holds ``min(tokens computed, B)`` entries between steps (plus the step's new
tokens during it); its table indexes entries, not positions, and its tail
blocks go back once the executor has evicted down to the budget. Such a
request takes no part in the prefix cache (its blocks are compacted in place,
and its later KV was computed without the evicted tokens). ``evicted`` records
which positions each one has dropped, as the executor reported them.

The radix tree needs a request that holds a cached block to hold every block
above it (so that eviction, leaves first, can reach every unowned block). So
a windowed request puts only its first ``window`` tokens' blocks into the
prefix cache (shared system prompts), and gives back cached blocks only once
the window has passed all the cached blocks it holds.
"""

from __future__ import annotations

from itertools import groupby, islice, repeat

from tokenmill.core.block_pool import BlockPool
from tokenmill.core.prefix_cache import PrefixCache
from tokenmill.core.request import Request

NULL_BLOCK = -1  # a table entry whose block was given back (its tokens are outside every window)


class KVManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, window: int | None = None
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.window = window  # every layer attends to at most this many keys (None: no window)
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
        # Per request: how many leading table entries are NULL_BLOCK (freed outside the window).
        self._window_freed: dict[str, int] = {}
        # Per request with a KV budget: the positions whose KV was evicted.
        self.evicted: dict[str, set[int]] = {}
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

    # ------------------------------------------------ KV entries (eviction)

    @staticmethod
    def kv_len(req: Request) -> int:
        """KV entries the request holds between steps: its computed tokens, or its budget."""
        ev = req.kv_eviction
        nc = req.num_computed_tokens
        return nc if ev is None or nc <= ev.budget else ev.budget

    def kv_offset(self, req: Request) -> int:
        """How many of the request's computed tokens have been evicted."""
        return req.num_computed_tokens - self.kv_len(req)

    def entries_needed(self, req: Request, num_new_tokens: int, num_steps: int = 1) -> int:
        """Table entries a plan of ``num_steps`` sub-steps needs, its first computing
        ``num_new_tokens`` tokens: all of them are written before any eviction."""
        c = self.kv_len(req)
        ev = req.kv_eviction
        if ev is None:
            return c + num_new_tokens + num_steps - 1
        return max(c + num_new_tokens, min(c + num_new_tokens + num_steps - 1, ev.budget + 1))

    def record_eviction(self, req: Request, positions: list[int]) -> None:
        """Note the positions the executor evicted (their count follows from the budget)."""
        gone = self.evicted.setdefault(req.request_id, set())
        gone.update(positions)
        if len(gone) != self.kv_offset(req):
            raise RuntimeError(
                f"request {req.request_id!r}: {len(gone)} positions evicted, but its budget says "
                f"{self.kv_offset(req)} of {req.num_computed_tokens}"
            )

    def kept_positions(self, req: Request) -> list[int]:
        """The positions whose KV the request holds now, in order."""
        gone = self.evicted.get(req.request_id, ())
        return [p for p in range(req.num_computed_tokens) if p not in gone]

    def shrink_to_budget(self, req: Request) -> None:
        """Give back the tail blocks that eviction emptied (one entry of room stays: the next decode's)."""
        table = self.tables.get(req.request_id)
        keep = self.blocks_for(self.kv_len(req) + 1)
        if table and len(table) > keep:
            extra = table[keep:]
            del table[keep:]
            self.pool.decref(extra[::-1])
            self._unsync(req.request_id, keep)

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
        if self.cache is None or req.kv_eviction is not None:
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
        num_tokens = self.kv_len(req) + len(computed) * self.block_size + num_new_tokens
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
        if self.cache is None or req.kv_eviction is not None:
            return
        table = self.tables.get(req.request_id)
        if not table or req.request_id in self._window_freed:
            return
        n_full = min(num_tokens // self.block_size, len(table))
        if self.window is not None and not req.hold_kv:
            n_full = min(n_full, self.window // self.block_size)  # see the module docstring
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

    def free_outside_window(self, req: Request) -> int:
        """Give back the request's blocks that no query from ``num_computed_tokens`` on can see
        (every layer attends to at most ``window`` keys); returns how many were freed."""
        rid = req.request_id
        table = self.tables.get(rid)
        if not table or self.window is None or req.hold_kv:
            return 0
        dead = min(max(0, req.num_computed_tokens - self.window + 1) // self.block_size, len(table))
        start = self._window_freed.get(rid, 0)
        if dead <= start:
            return 0
        # Its cached blocks are a leading run of its live entries (check_invariants): if the
        # first entry it keeps is cached, it holds cached blocks past the window, and those
        # keep their ancestors.
        if dead < len(table) and self.pool.cached[table[dead]]:
            return 0
        freed = table[start:dead]
        table[start:dead] = [NULL_BLOCK] * (dead - start)
        self.pool.decref(freed)
        self._window_freed[rid] = dead
        self._unsync(rid, start)
        return len(freed)

    def trim(self, req: Request, num_entries: int) -> None:
        """Give back the tail blocks of the request's table beyond what ``num_entries`` KV entries
        (its tokens, without eviction) need.

        Only for blocks reserved ahead and never written (the sub-steps of a
        cut multi-step plan): they return to the front of the free list.
        """
        table = self.tables.get(req.request_id)
        if not table:
            return
        keep = self.blocks_for(num_entries)
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
        self.evicted.pop(req.request_id, None)
        skip = self._window_freed.pop(req.request_id, 0)
        table = self.tables.pop(req.request_id, None)
        if table:
            self.pool.decref(table[skip:][::-1])  # entries before ``skip`` were given back already

    # ---------------------------------------------------- KV export and import

    def hold(self, req: Request) -> None:
        """Keep a finishing request's blocks owned, for export, until ``release``.

        (The scheduler frees no window blocks of a ``hold_kv`` request: all its KV can be exported.)"""
        if self._window_freed.get(req.request_id):
            raise ValueError(f"request {req.request_id!r} gave back blocks outside its window; it cannot be held")
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
            self._keys.pop(req.request_id, None)
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
        self._keys.pop(request_id, None)
        self.pool.decref(entry[0][::-1])
        return True

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        owners = [0] * self.pool.num_blocks
        cached = self.pool.cached
        for table in [*self.tables.values(), *self.held.values(), *(t for t, _ in self.imports.values())]:
            live = [b for b in table if b != NULL_BLOCK]
            if NULL_BLOCK in table[len(table) - len(live) :]:
                raise AssertionError("given-back entries must lead a table")
            run = next((i for i, b in enumerate(live) if not cached[b]), len(live))
            if any(cached[b] for b in live[run:]):
                # what lets eviction (leaves first) reach every unowned cached block
                raise AssertionError("a table's cached blocks must be a leading run of its live entries")
            for b in live:
                owners[b] += 1
        if owners != self.pool.ref_counts:
            raise AssertionError("block ref counts disagree with the block tables")
