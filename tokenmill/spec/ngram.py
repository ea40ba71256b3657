"""Prompt-lookup (n-gram) drafts: continue the text the way it went the last time it looked like this.

The proposer finds the most recent earlier occurrence of the sequence's last
``n`` tokens (longest ``n`` first, from ``max_n`` down to ``min_n``) in its own
prompt and output, and proposes the tokens that followed it (Saxena, "Prompt
Lookup Decoding", 2023; vLLM's ``ngram`` method). When the match runs into the
end of the text, the proposal goes on periodically (the text after the match
is the start of a loop), which is what a greedy model caught in a repetition
does. No model, no KV: drafts are a pure function of the tokens, so the
executor verifies them by sampling the target and comparing
(``spec/verify.py``). Each request keeps an index of its n-grams that grows
with its tokens, so a proposal costs a few dictionary lookups.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class _Index:
    """A request's n-gram -> the end (exclusive) of its latest occurrence, for each n."""

    __slots__ = ("maps", "upto")

    def __init__(self, ns: range) -> None:
        self.maps: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in ns}
        self.upto = 0  # n-grams ending at positions < upto are indexed

    def extend(self, tokens: Sequence[int], upto: int) -> None:
        for end in range(self.upto + 1, upto + 1):
            for n, m in self.maps.items():
                if end >= n:
                    m[tuple(tokens[end - n : end])] = end
        self.upto = max(self.upto, upto)


class NgramProposer:
    """Drafts by prompt lookup; see the module docstring."""

    name = "ngram"
    draft_cost = 0.0  # a few dictionary lookups next to a forward pass
    writes_kv = False

    def __init__(self, max_n: int = 4, min_n: int = 1) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.ns = range(max_n, min_n - 1, -1)
        self._index: dict[str, _Index] = {}

    def propose_one(self, request_id: str, tokens: Sequence[int], num: int) -> list[int]:
        """Up to ``num`` drafts to follow ``tokens`` (fewer, or none, without a match)."""
        length = len(tokens)
        idx = self._index.get(request_id)
        if idx is None or idx.upto > length:
            idx = self._index[request_id] = _Index(self.ns)
        # Index every n-gram that ends before the last token, then look the suffix up:
        # a match is an earlier occurrence, never the suffix itself.
        idx.extend(tokens, length - 1)
        for n in self.ns:
            if n >= length:
                continue
            end = idx.maps[n].get(tuple(tokens[length - n :]))
            if end is None:
                continue
            out: list[int] = []
            for i in range(num):
                pos = end + i
                out.append(tokens[pos] if pos < length else out[pos - length])
            return out
        return []

    def propose(self, items: list[Any]) -> dict[str, list[int]]:
        """Drafts for each ``ProposeItem`` (request id, its tokens, how many)."""
        out: dict[str, list[int]] = {}
        for it in items:
            drafts = self.propose_one(it.request_id, it.token_ids, it.num)
            if drafts:
                out[it.request_id] = drafts
        return out

    def draft_probs(self, request_id: str, drafts: list[int]) -> None:
        """Prompt-lookup drafts are deterministic: there is no draft distribution."""
        return None

    def drop(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._index.pop(rid, None)

    def reset(self, request_id: str, start_pos: int) -> None:
        """A (re-)admitted request: its index is rebuilt from its tokens on first use."""
        self._index.pop(request_id, None)
