"""KV eviction for long contexts: a per-sequence budget of KV entries and what to keep in it.

A request with a ``KVEviction`` keeps at most ``budget`` tokens of KV after
every forward pass; a step's new tokens are written first (the cache briefly
holds ``budget + new`` entries) and the excess is dropped right after, so a
prompt longer than the budget is still read whole by its own chunk. Two
policies choose what stays, both always keeping the first ``sinks`` tokens
and the ``recent`` newest:

- ``streaming`` -- StreamingLLM (Xiao et al., 2023, "Efficient Streaming
  Language Models with Attention Sinks"): attention sinks plus a sliding
  window of recent tokens; the oldest non-sink token goes first.
- ``h2o`` -- H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient
  Generative Inference of Large Language Models"): of the older tokens, keep
  the heavy hitters, those with the largest attention mass accumulated over
  every query so far (summed over layers and heads; the attention kernel
  gathers it); the lightest goes first.

The core decides how many entries a sequence holds: ``min(tokens computed,
budget)``, so the simulator and the engine allocate the same blocks. Which
positions go is the executor's choice (H2O needs the attention mass it
measures); it reports them in the step result and the KV manager keeps the
record. Keys are stored rotated at their original positions and queries are
rotated at theirs, so RoPE's relative positions stay exact after eviction.
"""

from __future__ import annotations

from dataclasses import dataclass

EVICTION_POLICIES = ("streaming", "h2o")


@dataclass(frozen=True, slots=True)
class KVEviction:
    """Eviction of one request's KV: ``policy`` under a ``budget`` of tokens."""

    policy: str
    budget: int
    sinks: int = 4
    recent: int | None = None  # None: budget - sinks (streaming), budget // 2 (h2o)

    def __post_init__(self) -> None:
        if self.policy not in EVICTION_POLICIES:
            raise ValueError(f"unknown KV eviction policy {self.policy!r}; use one of {', '.join(EVICTION_POLICIES)}")
        if not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"kv_budget must be an integer >= 1, got {self.budget!r}")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"kv_sinks must be an integer >= 0, got {self.sinks!r}")
        if self.recent is not None and (not isinstance(self.recent, int) or self.recent < 1):
            raise ValueError(f"kv_recent must be an integer >= 1, got {self.recent!r}")
        if self.sinks + self.window > self.budget:
            raise ValueError(
                f"kv_budget {self.budget} is smaller than kv_sinks + kv_recent = {self.sinks} + {self.window}: "
                "the budget must hold the attention sinks and the recent window"
            )

    @property
    def window(self) -> int:
        """How many of the newest tokens are always kept."""
        if self.recent is not None:
            return self.recent
        return max(1, self.budget - self.sinks) if self.policy == "streaming" else max(1, self.budget // 2)

    def entries(self, num_tokens: int) -> int:
        """KV entries a sequence holds after a step that leaves ``num_tokens`` tokens computed."""
        return min(num_tokens, self.budget)
