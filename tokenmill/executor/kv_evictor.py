"""The executor's side of KV eviction: which position each KV entry holds, and compaction.

For every running request with a ``KVEviction`` (sent in its ``SeqSetup``) the
executor keeps, per KV entry of the request (entry ``i`` lives in slot
``blocks[i // bs] * bs + i % bs``), the position whose KV it holds and, for
H2O, the attention mass that entry has received, summed over layers, heads
and queries (the attention kernel adds it into ``AttentionMetadata.attn_mass``
during the forward pass). After each forward pass, a request holding more
entries than its budget drops the excess: never one of its first ``sinks``
positions or its ``recent`` newest; of the others, the oldest (StreamingLLM)
or the lightest (H2O). The survivors past the new length move into the holes
(one token copy each, in every layer: ``kv_format.copy_tokens``), so entries
stay dense and attention needs no mask; their order does not matter, since
every new query may see every kept entry and the step's new tokens always sit
at the end, in order.

How many entries a request holds is the core's to say (``min(tokens, budget)``,
``core/kv_eviction.py``); this module says which positions went, and the
executor reports them in the step result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.core.kv_eviction import KVEviction
from tokenmill.model.kv_format import KVFormat, copy_tokens


@dataclass(slots=True)
class _Entries:
    spec: KVEviction
    positions: torch.Tensor  # int64 [entries]: the position each entry holds
    mass: torch.Tensor | None  # fp32 [entries]: accumulated attention mass (H2O)


class KVEvictor:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seqs: dict[str, _Entries] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.seqs

    def admit(self, request_id: str, spec: KVEviction | None) -> None:
        """A request (re-)admitted with an empty cache: track it when it has a budget."""
        self.seqs.pop(request_id, None)
        if spec is not None:
            mass = torch.zeros(0, device=self.device) if spec.policy == "h2o" else None
            self.seqs[request_id] = _Entries(spec, torch.zeros(0, dtype=torch.long, device=self.device), mass)

    def drop(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.seqs.pop(rid, None)

    def num_entries(self, request_id: str) -> int:
        return int(self.seqs[request_id].positions.shape[0])

    def wants_mass(self, request_ids: list[str]) -> bool:
        """Whether a forward pass over these requests must gather attention mass."""
        return any(rid in self.seqs and self.seqs[rid].mass is not None for rid in request_ids)

    def after_forward(
        self,
        rows: list[tuple[str, int, int, int, list[int]]],
        attn_mass: torch.Tensor | None,
        kv_cache: torch.Tensor,
        block_size: int,
        head_dim: int,
        fmt: KVFormat,
    ) -> dict[str, list[int]]:
        """Take in a forward pass's new entries and evict down to each budget.

        ``rows``: per sequence of the batch that has a budget, ``(request id, its row
        in attn_mass, first position written, positions written, its block table)``.
        Returns the positions evicted, per request.
        """
        src: list[torch.Tensor] = []
        dst: list[torch.Tensor] = []
        evicted: dict[str, list[int]] = {}
        for rid, row, first, n_new, blocks in rows:
            e = self.seqs[rid]
            new = torch.arange(first, first + n_new, device=self.device)
            e.positions = torch.cat([e.positions, new])
            length = e.positions.shape[0]
            if e.mass is not None:
                e.mass = torch.cat([e.mass, torch.zeros(n_new, device=self.device)])
                if attn_mass is not None:
                    e.mass += attn_mass[row, :, :length].sum(0).to(e.mass.device)
            excess = length - e.spec.budget
            if excess <= 0:
                continue
            victims = self._choose(e, excess)
            evicted[rid] = e.positions[victims].tolist()
            keep = torch.ones(length, dtype=torch.bool, device=self.device)
            keep[victims] = False
            new_len = length - excess
            holes = victims[victims < new_len]
            movers = torch.nonzero(keep[new_len:]).flatten() + new_len
            if holes.numel():
                table = torch.tensor(blocks, dtype=torch.long, device=self.device)
                src.append(table[movers // block_size] * block_size + movers % block_size)
                dst.append(table[holes // block_size] * block_size + holes % block_size)
                e.positions[holes] = e.positions[movers]
                if e.mass is not None:
                    e.mass[holes] = e.mass[movers]
            e.positions = e.positions[:new_len]
            if e.mass is not None:
                e.mass = e.mass[:new_len]
        if src:
            copy_tokens(kv_cache, torch.cat(src), torch.cat(dst), head_dim, fmt)
        return evicted

    @staticmethod
    def _choose(e: _Entries, count: int) -> torch.Tensor:
        """Indices (sorted) of ``count`` entries to drop: never a sink or a recent one."""
        spec, pos = e.spec, e.positions
        newest = pos.max()
        protected = (pos < spec.sinks) | (pos > newest - spec.window)
        score = pos.double() if e.mass is None else e.mass.double()
        score = score.masked_fill(protected, float("inf"))
        # ties (equal mass) go to the older entry: a tiny position term breaks them
        if e.mass is not None:
            score = score + pos.double() * 1e-12
        victims = torch.topk(score, count, largest=False).indices
        return victims.sort().values
