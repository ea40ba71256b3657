"""The core routers in front of real replicas, through the HTTP server.

- ``prefix_aware`` sends requests that share a long prefix to the replica
  that served it first, and the prefix cache there shows it (the usage's
  cached tokens);
- ``least_outstanding_tokens`` keeps the replicas' work within 1.25x of each
  other under a burst of requests of mixed sizes (measured on the replicas:
  prompt tokens computed plus tokens generated);
- ``/metrics`` carries every replica's engine metrics under a ``replica`` label.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import httpx

from tests.cluster.conftest import MODEL_NAME, front_end, http_server
from tests.cluster.helpers import run_all
from tests.server.helpers import metric, parse_metrics
from tokenmill.core.request import SamplingParams


def test_prefix_aware_keeps_a_shared_prefix_on_one_replica(replicas: Any, cluster_model_dir: Any) -> None:
    engine = front_end(replicas, 2, router="prefix_aware")
    rng = random.Random(7)
    system = [rng.randrange(5, 300) for _ in range(96)]  # six full blocks
    with http_server(engine, cluster_model_dir) as srv:
        def complete(prompt: list[int]) -> dict[str, Any]:
            r = httpx.post(f"{srv.base_url}/v1/completions", timeout=60,
                           json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 4, "temperature": 0})  # fmt: skip
            assert r.status_code == 200, r.text
            return r.json()

        first = complete(system + [7])
        later = [complete(system + [rng.randrange(5, 300) for _ in range(rng.randint(1, 20))]) for _ in range(5)]
        other = complete([rng.randrange(5, 300) for _ in range(40)])
    routed = [rep for _, _, rep, _ in engine.routing_log]
    assert len(set(routed[:6])) == 1, routed  # the prefix's requests all went where the first one did
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    for body in later:
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 96
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_least_outstanding_tokens_balances_a_burst(replicas: Any) -> None:
    import ray

    actors, _ = replicas
    engine = front_end(replicas, 3, router="least_outstanding_tokens")
    rng = random.Random(3)
    requests = [(f"b{i}", [rng.randrange(5, 300) for _ in range(rng.randint(8, 100))],
                 SamplingParams(max_tokens=rng.randint(4, 40), temperature=0.0, ignore_eos=True))
                for i in range(30)]  # fmt: skip
    before = ray.get([a.state.remote() for a in actors])
    run_all(engine, requests)
    after = ray.get([a.state.remote() for a in actors])
    work = [a["num_prompt_tokens"] + a["num_generation_tokens"] - b["num_prompt_tokens"] - b["num_generation_tokens"]
            for a, b in zip(after, before, strict=True)]  # fmt: skip
    assert sum(work) == sum(len(p) + sp.max_tokens for _, p, sp in requests)  # unique prompts: no cache hits
    assert max(work) <= 1.25 * min(work), work
    assert Counter(rep for _, _, rep, _ in engine.routing_log).keys() == {0, 1, 2}


def test_metrics_carry_a_replica_label(replicas: Any, cluster_model_dir: Any) -> None:
    engine = front_end(replicas, 2)
    with http_server(engine, cluster_model_dir) as srv:

        async def burst() -> None:
            async with httpx.AsyncClient(timeout=60) as client:
                rs = await asyncio.gather(*(client.post(f"{srv.base_url}/v1/completions",
                                                        json={"model": MODEL_NAME, "prompt": [9, 8, 7, i],
                                                              "max_tokens": 3}) for i in range(4)))  # fmt: skip
                assert all(r.status_code == 200 for r in rs)

        asyncio.run(burst())
        text = httpx.get(f"{srv.base_url}/metrics", timeout=10).text
    m = parse_metrics(text)
    for replica in ("0", "1"):
        assert metric(m, "tokenmill_request_finished_total", replica=replica) >= 2
        assert metric(m, "tokenmill_kv_blocks_total", replica=replica) == 256
        assert metric(m, "tokenmill_replica_up", replica=replica, role="both") == 1
        assert metric(m, "tokenmill_requests_routed_total", replica=replica) == 2
    # The Ray hop of each request's first token (front end -> engine -> front end), measured.
    assert metric(m, "tokenmill_ray_hop_seconds_count") == 4
    assert 0 < metric(m, "tokenmill_ray_hop_seconds_sum") < 4 * 5.0
    # One family per name: the merged page is valid Prometheus text.
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types))


def test_structured_outputs_are_refused_by_name(replicas: Any, cluster_model_dir: Any) -> None:
    from tests.server.helpers import assert_error_shape

    engine = front_end(replicas, 2)
    with http_server(engine, cluster_model_dir) as srv:
        r = httpx.post(f"{srv.base_url}/v1/completions", timeout=60,
                       json={"model": MODEL_NAME, "prompt": [5, 6], "max_tokens": 3,
                             "response_format": {"type": "json_object"}})  # fmt: skip
        assert_error_shape(r, 400, code="unsupported_with_cluster")
        ok = httpx.post(f"{srv.base_url}/v1/completions", timeout=60,
                        json={"model": MODEL_NAME, "prompt": [5, 6], "max_tokens": 3})  # fmt: skip
        assert ok.status_code == 200
