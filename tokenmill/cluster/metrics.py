"""``/metrics`` of a cluster: every replica's engine metrics with a ``replica`` label, plus the front end's.

Each replica keeps the single-process server's metrics (``server/metrics.py``)
for its own engine. The front end fetches their Prometheus text before each
scrape (``ClusterEngine.collect_metrics``), adds ``replica="<index>"`` to
every sample and merges the families by name, so a dashboard built for one
engine sums or splits the replicas with the usual label selectors. Its own
families come on top: what the front end refused (``tokenmill_request_rejected``,
as in one process), which replicas are up, restarts, requests re-routed or
failed after a replica died, routing decisions, and the prefill-to-decode
KV transfers (blocks, bytes, latency, blocks the decode replica's prefix
cache already held).

In prefill/decode serving a request counts on two replicas: its prompt,
first token and TTFT on the prefill replica (which finishes it with reason
``handoff``), the rest on the decode replica.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.server.metrics import ServerMetrics

# The Ray hop: a millisecond matters (the target is 3 ms at concurrency 1).
_HOP_BUCKETS = (0.0002, 0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
                0.05, 0.1, 0.2, 0.5, 1.0)  # fmt: skip
_TRANSFER_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class ClusterMetrics(ServerMetrics):
    """The front end's metrics; ``render`` merges the replicas' latest pages in."""

    def __init__(self, model_name: str, roles: list[str]) -> None:
        super().__init__(model_name)
        r, lab = self.registry, ("model_name",)
        self.roles = roles
        self.replica_up = Gauge("tokenmill_replica_up", "1 while the replica serves, 0 while it is down.",
                                (*lab, "replica", "role"), registry=r)  # fmt: skip
        self.replica_restarts = Counter("tokenmill_replica_restarts", "Times a replica came back after it died.",
                                        (*lab, "replica"), registry=r)  # fmt: skip
        self.routed = Counter("tokenmill_requests_routed", "Requests the front end's router sent to each replica.",
                              (*lab, "replica"), registry=r)  # fmt: skip
        self.retried = Counter("tokenmill_requests_retried",
                               "Requests moved to another replica because theirs died before any token was sent.",
                               lab, registry=r)  # fmt: skip
        self.failed = Counter("tokenmill_requests_replica_failed",
                              "Requests ended with an error because their replica died after tokens were sent.",
                              lab, registry=r)  # fmt: skip
        self.kv_transfers = Counter("tokenmill_kv_transfers", "Prefill-to-decode handoffs that moved KV.", lab,
                                    registry=r)  # fmt: skip
        self.kv_transfer_blocks = Counter("tokenmill_kv_transfer_blocks", "KV blocks moved prefill to decode.", lab,
                                          registry=r)  # fmt: skip
        self.kv_transfer_bytes = Counter("tokenmill_kv_transfer_bytes", "KV bytes moved prefill to decode.", lab,
                                         registry=r)  # fmt: skip
        self.kv_reused_blocks = Counter("tokenmill_kv_transfer_reused_blocks",
                                        "Prompt blocks not moved: the decode replica's prefix cache held them.",
                                        lab, registry=r)  # fmt: skip
        self.kv_recomputed = Counter("tokenmill_kv_transfer_recomputed",
                                     "Handoffs whose decode replica recomputed the prompt (no room, or the KV was lost).",
                                     lab, registry=r)  # fmt: skip
        self.kv_transfer_seconds = Histogram("tokenmill_kv_transfer_seconds",
                                             "Export, move and import of one handoff's KV.", lab,
                                             buckets=_TRANSFER_BUCKETS, registry=r)  # fmt: skip
        self.ray_hop_seconds = Histogram(
            "tokenmill_ray_hop_seconds",
            "Time a request's first token spent between the front end and its replica: the add call until the "
            "replica's engine took the request, plus the first token's way back from the engine to the front end.",
            lab, buckets=_HOP_BUCKETS, registry=r)  # fmt: skip
        self._pages: dict[int, bytes] = {}
        for i in range(len(roles)):
            self.set_up(i, True)

    # ------------------------------------------------------------ front end

    def set_up(self, replica: int, up: bool) -> None:
        self.replica_up.labels(**self._labels, replica=str(replica), role=self.roles[replica]).set(1 if up else 0)
        if not up:
            self._pages.pop(replica, None)  # a page of a process that is gone would lie

    def on_restart(self, replica: int) -> None:
        self.replica_restarts.labels(**self._labels, replica=str(replica)).inc()

    def on_hop(self, seconds: float) -> None:
        self.ray_hop_seconds.labels(**self._labels).observe(max(seconds, 0.0))

    def on_routed(self, replica: int) -> None:
        self.routed.labels(**self._labels, replica=str(replica)).inc()

    def on_retry(self) -> None:
        self.retried.labels(**self._labels).inc()

    def on_failed(self) -> None:
        self.failed.labels(**self._labels).inc()

    def on_transfer(self, blocks: int, reused_blocks: int, nbytes: int, seconds: float) -> None:
        lab = self._labels
        self.kv_transfers.labels(**lab).inc()
        self.kv_transfer_blocks.labels(**lab).inc(blocks)
        self.kv_transfer_bytes.labels(**lab).inc(nbytes)
        self.kv_reused_blocks.labels(**lab).inc(reused_blocks)
        self.kv_transfer_seconds.labels(**lab).observe(seconds)

    def on_recomputed(self) -> None:
        self.kv_recomputed.labels(**self._labels).inc()

    def set_page(self, replica: int, page: bytes) -> None:
        self._pages[replica] = page

    # --------------------------------------------------------------- render

    def render(self) -> bytes:
        merged: dict[str, Any] = {}
        for fam in self.registry.collect():
            if fam.samples:
                merged[fam.name] = fam
        for replica, page in sorted(self._pages.items()):
            for fam in text_string_to_metric_families(page.decode()):
                for s in fam.samples:
                    s.labels["replica"] = str(replica)
                have = merged.get(fam.name)
                if have is None:
                    merged[fam.name] = fam
                else:
                    have.samples.extend(fam.samples)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(list(merged.values())))
        return generate_latest(registry)


class _Families:
    """A collector that yields families already built (for ``generate_latest``)."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Iterator[Any]:
        yield from self.families
