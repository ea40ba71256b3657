"""Prometheus metrics for ``GET /metrics``, on a registry of the server's own.

A registry per server (not prometheus-client's global one) lets tests start
several apps in one process and keeps library metrics out of the page.
Updates come from the engine thread, which sees every output and every step
(prometheus-client is thread-safe); the event loop only renders the page.

Latencies are measured on the engine's clock from the moment the HTTP
handler accepted the request:

- ``time_to_first_token``: arrival -> first generated token of the request;
- ``inter_token_latency``: the gap between consecutive outputs of a sample,
  spread evenly over the tokens it brought (a multi-step decode plan hands
  over several tokens at once);
- ``time_per_output_token``: per finished sample with at least two tokens,
  (its last token - its first token) / (its tokens - 1), i.e. vLLM's
  (e2e - TTFT) / (output tokens - 1) for each sequence;
- ``e2e_request_latency``: arrival -> the request's last sample finished;
- ``request_queue_time``: arrival -> first scheduled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tokenmill.engine import EngineStats
from tokenmill.outputs import RequestOutput

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_TPOT_BUCKETS = (*_ITL_BUCKETS, 5.0, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 300.0)


@dataclass
class _Track:
    arrival: float
    first_token_seen: bool = False
    last_token_time: dict[int, float] = field(default_factory=dict)  # sample index -> time
    first_token_time: dict[int, float] = field(default_factory=dict)  # sample index -> time
    num_tokens: dict[int, int] = field(default_factory=dict)  # sample index -> tokens so far
    finished: set[int] = field(default_factory=set)  # samples whose TPOT is observed


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels = self.registry, {"model_name": model_name}
        self._labels = labels

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, (*labels, *extra), registry=r)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, (*labels, *extra), registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, tuple(labels), buckets=buckets, registry=r)

        self.requests_finished = counter(
            "tokenmill_request_finished",
            "Finished sequences by finish reason (stop, length, abort); a request with n samples counts n times.",
            ("finish_reason",),
        )
        self.requests_received = counter("tokenmill_request_received", "User requests accepted by the engine.")
        self.requests_rejected = counter(
            "tokenmill_request_rejected", "Requests refused before they reached the engine, by reason.", ("reason",)
        )
        self.ttft = histogram("tokenmill_time_to_first_token_seconds", "Arrival to first token.", _TTFT_BUCKETS)
        self.itl = histogram("tokenmill_inter_token_latency_seconds", "Time between tokens of a sample.", _ITL_BUCKETS)
        self.tpot = histogram(
            "tokenmill_time_per_output_token_seconds",
            "Per finished sample: (last token - first token) / (output tokens - 1).",
            _TPOT_BUCKETS,
        )
        self.e2e = histogram("tokenmill_e2e_request_latency_seconds", "Arrival to last token.", _E2E_BUCKETS)
        self.queue_time = histogram("tokenmill_request_queue_time_seconds", "Arrival to first scheduled.", _E2E_BUCKETS)
        self.running = gauge("tokenmill_num_requests_running", "Sequences running in the engine.")
        self.waiting = gauge("tokenmill_num_requests_waiting", "Sequences waiting (or preempted) in the engine.")
        self.in_flight = gauge("tokenmill_num_requests_in_flight", "User requests the server is answering.")
        self.kv_usage = gauge("tokenmill_kv_cache_usage_ratio", "Fraction of KV blocks owned by requests.")
        self.kv_blocks = gauge(
            "tokenmill_kv_blocks",
            "KV blocks by state: used (owned by a request), cached (prefix cache, evictable), free.",
            ("state",),
        )
        self.kv_blocks_total = gauge("tokenmill_kv_blocks_total", "KV blocks in the pool.")
        self.preemptions = counter("tokenmill_num_preemptions", "Preemptions (by recompute).")
        self.prompt_tokens = counter("tokenmill_prompt_tokens", "Prompt tokens of accepted requests.")
        self.generation_tokens = counter("tokenmill_generation_tokens", "Generated tokens.")
        self.prefix_queries = counter("tokenmill_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("tokenmill_prefix_cache_hits", "Prompt tokens served from the prefix cache.")
        self.engine_steps = counter("tokenmill_engine_steps", "Engine steps (plans) run.")
        # Speculative decoding (vLLM's spec_decode counters, plus the derived ratios).
        self.spec_drafts = counter("tokenmill_spec_decode_num_drafts", "Verifications: sequences whose drafts were checked.")
        self.spec_draft_tokens = counter("tokenmill_spec_decode_num_draft_tokens", "Draft tokens checked.")
        self.spec_accepted = counter("tokenmill_spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.spec_acceptance = gauge("tokenmill_spec_decode_acceptance_rate", "Accepted over checked draft tokens.")
        self.spec_mean_len = gauge(
            "tokenmill_spec_decode_mean_accepted_length", "Tokens per verification: accepted drafts plus one."
        )
        self.spec_draft_share = gauge(
            "tokenmill_spec_decode_draft_time_share", "Share of execution time spent proposing drafts."
        )
        self.expert_cache = counter(
            "tokenmill_expert_cache_lookups",
            "Offloaded MoE experts looked up, by result: hit (in RAM) or miss (read from the checkpoint).",
            ("result",),
        )
        self.expert_bytes_read = counter(
            "tokenmill_expert_cache_read_bytes", "Bytes of experts read from the memory-mapped checkpoint."
        )
        self._last: EngineStats | None = None
        self._tracks: dict[str, _Track] = {}

    # ------------------------------------------------------------ engine thread

    def on_added(self, request_id: str, arrival: float, num_prompt_tokens: int, continued: bool = False) -> None:
        """A request entered the engine; ``continued``: it continues tokens generated on another
        engine (prefill/decode), whose first token and prompt were counted there."""
        self._tracks[request_id] = _Track(arrival, first_token_seen=continued)
        self.requests_received.labels(**self._labels).inc()
        if not continued:
            self.prompt_tokens.labels(**self._labels).inc(num_prompt_tokens)

    def on_output(self, out: RequestOutput, now: float) -> None:
        track = self._tracks.get(out.request_id)
        if track is None:
            return
        lab = self._labels
        m = out.metrics
        for sample in out.outputs:
            k = len(sample.delta_token_ids)
            if k:
                self.generation_tokens.labels(**lab).inc(k)
                last = track.last_token_time.get(sample.index)
                if last is None:
                    if not track.first_token_seen:
                        track.first_token_seen = True
                        first = m.first_token_time if m and m.first_token_time else now
                        self.ttft.labels(**lab).observe(max(0.0, first - track.arrival))
                        if m and m.first_scheduled_time is not None:
                            self.queue_time.labels(**lab).observe(max(0.0, m.first_scheduled_time - track.arrival))
                    k -= 1  # the sample's first token has no gap before it
                else:
                    gap = max(0.0, now - last) / k
                    for _ in range(k):
                        self.itl.labels(**lab).observe(gap)
                track.last_token_time[sample.index] = now
                track.first_token_time.setdefault(sample.index, now)
                track.num_tokens[sample.index] = track.num_tokens.get(sample.index, 0) + len(sample.delta_token_ids)
            if sample.finish_reason is not None and sample.index not in track.finished:
                track.finished.add(sample.index)
                n = track.num_tokens.get(sample.index, 0)
                if n >= 2:
                    span = track.last_token_time[sample.index] - track.first_token_time[sample.index]
                    self.tpot.labels(**lab).observe(max(0.0, span) / (n - 1))
        if out.finished:
            del self._tracks[out.request_id]
            for sample in out.outputs:
                self.requests_finished.labels(**lab, finish_reason=sample.finish_reason or "stop").inc()
            self.e2e.labels(**lab).observe(max(0.0, now - track.arrival))

    def on_stats(self, stats: EngineStats, in_flight: int, num_free_blocks: int | None = None) -> None:
        """Refresh gauges and advance counters from a stats snapshot.

        ``num_free_blocks`` (the pool's free list) splits the unowned blocks
        into free and cached exactly; without it the split is estimated from
        the prefix cache's size.
        """
        lab = self._labels
        s = stats.scheduler
        self.running.labels(**lab).set(s.num_running)
        self.waiting.labels(**lab).set(s.num_waiting)
        self.in_flight.labels(**lab).set(in_flight)
        self.kv_usage.labels(**lab).set(s.kv_usage)
        self.kv_blocks_total.labels(**lab).set(s.num_blocks)
        unowned = s.num_blocks - s.num_used_blocks
        if num_free_blocks is None:
            # num_cached_blocks counts every block the prefix cache holds, owned or not.
            num_free_blocks = unowned - min(s.num_cached_blocks, unowned)
        self.kv_blocks.labels(**lab, state="used").set(s.num_used_blocks)
        self.kv_blocks.labels(**lab, state="cached").set(unowned - num_free_blocks)
        self.kv_blocks.labels(**lab, state="free").set(num_free_blocks)
        last = self._last
        self.preemptions.labels(**lab).inc(s.num_preemptions - (last.scheduler.num_preemptions if last else 0))
        self.prefix_queries.labels(**lab).inc(
            s.prefix_query_tokens - (last.scheduler.prefix_query_tokens if last else 0)
        )
        self.prefix_hits.labels(**lab).inc(s.prefix_hit_tokens - (last.scheduler.prefix_hit_tokens if last else 0))
        self.engine_steps.labels(**lab).inc(stats.num_steps - (last.num_steps if last else 0))
        sp = stats.spec
        if sp is not None:
            before = last.spec if last is not None and last.spec is not None else None
            self.spec_drafts.labels(**lab).inc(sp.num_drafts - (before.num_drafts if before else 0))
            self.spec_draft_tokens.labels(**lab).inc(sp.num_draft_tokens - (before.num_draft_tokens if before else 0))
            self.spec_accepted.labels(**lab).inc(sp.num_accepted_tokens - (before.num_accepted_tokens if before else 0))
            self.spec_acceptance.labels(**lab).set(sp.acceptance_rate)
            self.spec_mean_len.labels(**lab).set(sp.mean_accepted_length)
            self.spec_draft_share.labels(**lab).set(stats.draft_time_share)
        ec, prev = stats.expert_cache, (last.expert_cache if last else None)
        if ec is not None:
            self.expert_cache.labels(**lab, result="hit").inc(ec.hits - (prev.hits if prev else 0))
            self.expert_cache.labels(**lab, result="miss").inc(ec.misses - (prev.misses if prev else 0))
            self.expert_bytes_read.labels(**lab).inc(ec.bytes_read - (prev.bytes_read if prev else 0))
        self._last = stats

    # ------------------------------------------------------------- event loop

    def reject(self, reason: str) -> None:
        self.requests_rejected.labels(**self._labels, reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
