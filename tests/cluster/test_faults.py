"""Acceptance: a replica that dies mid-load (its actor killed) costs no hung or lost request.

Two replicas serve 36 streamed and 4 plain requests (more than one replica
runs at once, so some wait in its queue); once all are routed and tokens
flow, replica 0's actor is killed (Ray restarts it). Every request must end, within a bound, either
complete or with an error in OpenAI's shape: an error event in a stream
that had started, a 503 for a plain request. Requests that had sent nothing
(those queued on the dead replica) are retried on the other one and
complete. While replica 0 is down the router sends nothing to it; it comes
back and is routed to again; neither replica holds a request or a KV block at
the end.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from tests.cluster.conftest import MODEL_NAME, front_end, http_server
from tests.server.helpers import assert_error_shape


async def _stream(client: httpx.AsyncClient, url: str, prompt: list[int]) -> dict[str, Any]:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 160, "ignore_eos": True, "stream": True}
    got: dict[str, Any] = {"tokens": 0, "finish": None, "error": None, "done": False}
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:  # refused before the stream started
            await r.aread()
            assert_error_shape(r, 503, code="engine_unavailable")
            got.update(error=r.json()["error"], done=True)
            return got
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                got["done"] = True
                continue
            event = json.loads(data)
            if "error" in event:
                got["error"] = event["error"]
                continue
            choice = event["choices"][0]
            got["tokens"] += 1
            got["finish"] = choice["finish_reason"] or got["finish"]
    return got


async def _plain(client: httpx.AsyncClient, url: str, prompt: list[int]) -> httpx.Response:
    return await client.post(url, json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 60, "ignore_eos": True})


def test_a_killed_replica_is_survived(replicas: Any, cluster_model_dir: Any) -> None:
    import ray

    actors, _ = replicas
    engine = front_end(replicas, 2, router="round_robin")
    # Where the routing log stood when the router learnt that replica 0 went down and came back.
    marks: dict[bool, int] = {}
    set_available = engine.router.set_available

    def watch(replica: int, up: bool) -> None:
        if replica == 0:
            marks.setdefault(up, len(engine.routing_log))
        set_available(replica, up)

    engine.router.set_available = watch  # type: ignore[method-assign]
    on0: set[str] = set()  # requests on replica 0 when it is killed
    unsent: set[str] = set()  # ... those that had not sent a token
    with http_server(engine, cluster_model_dir) as srv:
        url = f"{srv.base_url}/v1/completions"

        async def scenario() -> tuple[list[Any], list[Any]]:
            async with httpx.AsyncClient(timeout=httpx.Timeout(90.0)) as client:
                streams = [asyncio.ensure_future(_stream(client, url, [31, 32, 33, i])) for i in range(36)]
                plains = [asyncio.ensure_future(_plain(client, url, [41, 42, i])) for i in range(4)]
                deadline = time.monotonic() + 60
                # Every request is routed (20 per replica: 16 run, 4 wait) and replica 0 streams.
                while len(engine.routing_log) < 40 or sum(t.sent and t.replica == 0 for t in engine.tracks.values()) < 4:
                    assert time.monotonic() < deadline, "no tokens flowed from replica 0"
                    await asyncio.sleep(0.002)
                # (The server's thread moves on meanwhile: some of these may still send a token first.)
                tracks = list(engine.tracks.values())
                on0.update(t.request_id for t in tracks if t.replica == 0)
                unsent.update(t.request_id for t in tracks if t.replica == 0 and not t.sent)
                ray.kill(actors[0], no_restart=False)
                # Nothing hangs: everything ends well within the clients' own timeouts.
                done = await asyncio.wait_for(asyncio.gather(*streams, *plains, return_exceptions=True), 80)
            return done[:36], done[36:]

        streamed, plain = asyncio.run(scenario())
        complete = [s for s in streamed if s["finish"] == "length" and s["error"] is None]
        broken = [s for s in streamed if s["error"] is not None]
        refused = [r for r in plain if r.status_code != 200]
        assert len(complete) + len(broken) == 36, streamed
        for s in broken:
            assert s["done"] and s["error"]["code"] == "engine_unavailable" and "retry" in s["error"]["message"]
        for r in refused:
            assert_error_shape(r, 503, code="engine_unavailable")
        assert broken, "the requests running on the killed replica end with an error"
        # Those that had sent nothing (at least the ones queued on the dead replica) were retried on
        # the other one, while it was down (the router sent nothing else, and nothing to replica 0),
        # and completed; every other request of replica 0 failed cleanly; all the rest completed.
        deadline = time.monotonic() + 90
        while not engine.replicas[0].up:
            assert time.monotonic() < deadline, "the replica did not come back"
            time.sleep(0.1)
        retried = int(engine.metrics.retried.labels(model_name=MODEL_NAME)._value.get())
        down = engine.routing_log[marks[False] : marks[True]]
        assert 1 <= retried == len(down), (retried, down)
        assert {rid for rid, _, _, _ in down} <= unsent and {rep for _, _, rep, _ in down} == {1}
        assert len(on0) == 20 and len(broken) + len(refused) == len(on0) - retried
        n = len(engine.routing_log)
        after = [httpx.post(url, json={"model": MODEL_NAME, "prompt": [51, i], "max_tokens": 3}, timeout=60)
                 for i in range(4)]  # fmt: skip
        assert all(r.status_code == 200 for r in after)
        assert {rep for _, _, rep, _ in engine.routing_log[n:]} == {0, 1}
        metrics = httpx.get(f"{srv.base_url}/metrics", timeout=10).text
        assert 'tokenmill_replica_restarts_total{model_name="tiny",replica="0"} 1.0' in metrics
    for state in ray.get([a.state.remote() for a in actors[:2]]):
        assert state["requests"] == 0 and state["used_blocks"] == 0 and not state["held"] and not state["imports"]
