"""Replica choice for a cluster of engines: round-robin, least outstanding tokens, prefix-aware.

The router lives in the core so that the simulator and the real cluster route
with the same code. It is pure Python with no clock: its only inputs are the
requests it routes and the finishes it is told about, and it keeps its own
books (what it sent where and has not finished yet, which prompt prefixes it
sent where). It never reads a replica's scheduler, so a decision depends only
on events that both the real cluster and the simulator see at the same
moments, whatever the granularity of the replicas' step plans.

``route(req) -> replica index`` and ``on_finished(req)`` are the whole
interface of a decision; a router that needs more is a new class registered
by name. A real cluster also tells the router when a replica goes down and
comes back (``set_available``): a router never picks a replica that is down
(``NoReplicaError`` when none is up). The simulator's replicas never go
down, so its decisions do not depend on this.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from tokenmill.core.request import Request


class NoReplicaError(RuntimeError):
    """Every replica is down: the request cannot be routed."""


class Router:
    """Base router: keeps per-replica outstanding token and request counts."""

    name = "base"

    def __init__(self, num_replicas: int, **options: Any) -> None:
        if num_replicas < 1:
            raise ValueError(f"a router needs at least one replica, got {num_replicas}")
        if options:
            raise ValueError(f"router {self.name!r} takes no options, got {sorted(options)}")
        self.num_replicas = num_replicas
        self.outstanding_tokens = [0] * num_replicas
        self.outstanding_requests = [0] * num_replicas
        self._charged: dict[str, tuple[int, int]] = {}  # request id -> (replica, tokens charged)
        self.available = [True] * num_replicas
        self.num_down = 0

    def set_available(self, replica: int, up: bool) -> None:
        """A replica went down (it is not picked until it is back) or came back."""
        if self.available[replica] != up:
            self.available[replica] = up
            self.num_down += -1 if up else 1

    def up_replicas(self) -> list[int]:
        """The replicas that may be picked; raises ``NoReplicaError`` when there is none."""
        up = [r for r, ok in enumerate(self.available) if ok]
        if not up:
            raise NoReplicaError(f"all {self.num_replicas} replicas are down")
        return up

    @staticmethod
    def request_cost(req: Request) -> int:
        """Tokens a request will cost its replica: prompt plus expected output.

        The expected output is ``predicted_output_len`` when the caller has a
        prediction, else ``max_tokens`` (an upper bound), else the prompt length.
        """
        out = req.predicted_output_len
        if out is None:
            out = req.sampling_params.max_tokens
        if out is None:
            out = req.num_prompt_tokens
        return req.num_prompt_tokens + out

    def route(self, req: Request) -> int:
        """Pick a replica for ``req`` and charge it; the caller adds the request there.

        Raises ``NoReplicaError`` (charging nothing) when every replica is down.
        """
        replica = self.choose(req)
        cost = self.request_cost(req)
        self.outstanding_tokens[replica] += cost
        self.outstanding_requests[replica] += 1
        self._charged[req.request_id] = (replica, cost)
        return replica

    def choose(self, req: Request) -> int:
        raise NotImplementedError

    def on_finished(self, req: Request) -> None:
        """The request finished (or was aborted) on the replica it was routed to."""
        charged = self._charged.pop(req.request_id, None)
        if charged is None:
            return
        replica, cost = charged
        self.outstanding_tokens[replica] -= cost
        self.outstanding_requests[replica] -= 1

    def least_loaded(self) -> int:
        """The replica (among those up) with the fewest outstanding tokens (lowest index on ties)."""
        load = self.outstanding_tokens
        if not self.num_down:
            return load.index(min(load))
        return min(self.up_replicas(), key=lambda r: (load[r], r))


_REGISTRY: dict[str, type[Router]] = {}


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    def wrap(cls: type[Router]) -> type[Router]:
        if name in _REGISTRY:
            raise ValueError(f"router {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_routers() -> list[str]:
    return sorted(_REGISTRY)


def make_router(name: str, num_replicas: int, **options: Any) -> Router:
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; available: {', '.join(available_routers())}") from None
    return cls(num_replicas, **options)


@register_router("round_robin")
class RoundRobinRouter(Router):
    """Replicas in turn, whatever their load."""

    def __init__(self, num_replicas: int, **options: Any) -> None:
        super().__init__(num_replicas, **options)
        self._next = 0

    def choose(self, req: Request) -> int:
        n = self.num_replicas
        r = self._next
        if not self.available[r]:
            up = self.up_replicas()
            r = next((u for u in up if u > r), up[0])  # the next one up, in turn
        self._next = (r + 1) % n
        return r

    @staticmethod
    def static_assignment(index: int, num_replicas: int) -> int:
        """Round-robin depends on nothing but arrival order, so a simulator may route ahead."""
        return index % num_replicas


@register_router("least_outstanding_tokens")
class LeastOutstandingTokensRouter(Router):
    """The replica with the fewest tokens routed to it and not yet finished (join-shortest-queue by work)."""

    def choose(self, req: Request) -> int:
        return self.least_loaded()


@register_router("prefix_aware")
class PrefixAwareRouter(Router):
    """Send a request where its longest prompt prefix went before, unless that breaks the balance.

    Follows the cache-aware routing of SGLang's router: the router keeps, per
    replica, an approximate record of the full-block prompt prefixes it sent
    there (chained block hashes, LRU-bounded to ``max_blocks_per_replica``),
    picks the replica with the longest match when the match covers at least
    ``min_match_ratio`` of the prompt, and falls back to the least-loaded
    replica when there is no such match or when loads are out of balance
    (the busiest replica has more than ``balance_abs_threshold`` outstanding
    tokens above the idlest and more than ``balance_rel_threshold`` times it).
    """

    def __init__(
        self,
        num_replicas: int,
        block_size: int = 16,
        max_blocks_per_replica: int = 1 << 20,
        min_match_ratio: float = 0.1,
        balance_abs_threshold: int = 32768,
        balance_rel_threshold: float = 2.0,
    ) -> None:
        super().__init__(num_replicas)
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.max_blocks = max_blocks_per_replica
        self.min_match_ratio = min_match_ratio
        self.balance_abs = balance_abs_threshold
        self.balance_rel = balance_rel_threshold
        # Per replica: chained block hash -> None, in LRU order (oldest first).
        self._seen: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_replicas)]
        self.num_prefix_routed = 0

    def _chain(self, req: Request) -> list[int]:
        bs = self.block_size
        toks = req.prompt_token_ids
        h = hash(req.cache_namespace)
        out = []
        for i in range(len(toks) // bs):
            h = hash((h, tuple(toks[i * bs : (i + 1) * bs])))
            out.append(h)
        return out

    def set_available(self, replica: int, up: bool) -> None:
        super().set_available(replica, up)
        if not up:
            self._seen[replica].clear()  # a replica that went down comes back with an empty cache

    def choose(self, req: Request) -> int:
        chain = self._chain(req)
        load = self.outstanding_tokens
        if not self.num_down:
            up: range | list[int] = range(self.num_replicas)
            lo, hi = min(load), max(load)
        else:
            up = self.up_replicas()
            lo, hi = min(load[r] for r in up), max(load[r] for r in up)
        balanced = hi - lo <= self.balance_abs or hi <= self.balance_rel * max(lo, 1)
        best, best_len = -1, 0
        if chain and balanced:
            for r in up:
                seen = self._seen[r]
                n = 0
                for h in chain:
                    if h not in seen:
                        break
                    n += 1
                if n > best_len or (n == best_len and n > 0 and load[r] < load[best]):
                    best, best_len = r, n
        if best >= 0 and best_len * self.block_size >= self.min_match_ratio * req.num_prompt_tokens:
            self.num_prefix_routed += 1
            replica = best
        else:
            replica = next(r for r in up if load[r] == lo)
        seen = self._seen[replica]
        for h in chain:
            if h in seen:
                seen.move_to_end(h)
            else:
                seen[h] = None
        while len(seen) > self.max_blocks:
            seen.popitem(last=False)
        return replica
