"""A bounded soak: every kind of request at once against a real server, then nothing is left behind.

Normal, streaming, n > 1 and batched requests run beside clients that leave
mid-stream and mid-response, prompts over the context length, malformed and
oversized bodies and refused templates. Afterwards: nothing in flight, no KV
block owned, no traceback logged, and a normal request is still answered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.helpers import (
    MAX_BODY_BYTES,
    MODEL_NAME,
    InProcessServer,
    engine_idle,
    make_app,
    wait_until,
)

SOAK_SECONDS = 12.0
NUM_WORKERS = 12


async def _stream(client: httpx.AsyncClient, path: str, body: dict[str, Any], leave_after: int | None) -> int:
    async with client.stream("POST", path, json={**body, "stream": True}) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return resp.status_code
        events = 0
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                events += 1
                if line != "data: [DONE]":
                    obj = json.loads(line[6:])
                    assert "error" not in obj, obj
                if leave_after is not None and events >= leave_after:
                    return -1  # leaving: the context manager closes the connection mid-stream
        assert events >= 2
        return resp.status_code


async def _one(client: httpx.AsyncClient, rng: random.Random) -> tuple[str, int]:
    user = [{"role": "user", "content": f"tell me about block {rng.randint(0, 99)}"}]
    kind = rng.choice(
        ["completion", "chat", "stream", "chat_stream", "leave_stream", "leave_plain", "n4", "batch",
         "too_long", "malformed", "bad_type", "oversized", "oversized_chunked", "template", "bad_ids"]
    )  # fmt: skip
    long_gen = {"max_tokens": 150, "ignore_eos": True}
    if kind == "completion":
        r = await client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "In the beginning", "max_tokens": 8})
        return kind, r.status_code
    if kind == "chat":
        r = await client.post("/v1/chat/completions", json={"messages": user, "max_tokens": 8})
        return kind, r.status_code
    if kind == "stream":
        return kind, await _stream(client, "/v1/completions", {"prompt": "the scheduler", "max_tokens": 12}, None)
    if kind == "chat_stream":
        return kind, await _stream(client, "/v1/chat/completions", {"messages": user, "max_tokens": 12, "n": 2}, None)
    if kind == "leave_stream":
        return kind, await _stream(client, "/v1/completions", {"prompt": "go on", **long_gen}, rng.randint(1, 4))
    if kind == "leave_plain":
        try:
            r = await client.post("/v1/completions", json={"prompt": "go on", "n": 3, **long_gen},
                                  timeout=rng.uniform(0.01, 0.3))  # fmt: skip
            return kind, r.status_code
        except httpx.TimeoutException:
            return kind, -1
    if kind == "n4":
        r = await client.post("/v1/completions", json={"prompt": "four", "n": 4, "max_tokens": 6})
        return kind, r.status_code
    if kind == "batch":
        prompt = rng.choice([["a", "b", "c"], [[1, 2, 3], [4, 5]]])
        r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4})
        return kind, r.status_code
    if kind == "too_long":
        r = await client.post("/v1/completions", json={"prompt": "many words here " * 200, "max_tokens": 4})
        return kind, r.status_code
    if kind == "malformed":
        r = await client.post("/v1/completions", content=b'{"prompt": "x", ', headers={"Content-Type": "application/json"})
        return kind, r.status_code
    if kind == "bad_type":
        r = await client.post("/v1/chat/completions", json={"messages": "hi", "n": "many"})
        return kind, r.status_code
    if kind == "oversized":
        r = await client.post("/v1/completions", json={"prompt": "x" * (MAX_BODY_BYTES + 1)})
        return kind, r.status_code
    if kind == "oversized_chunked":
        big = json.dumps({"prompt": "y" * (MAX_BODY_BYTES + 1)}).encode()

        async def chunks() -> Any:
            for i in range(0, len(big), 16384):
                yield big[i : i + 16384]

        r = await client.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
        return kind, r.status_code
    if kind == "template":
        r = await client.post("/v1/chat/completions", json={"messages": user, "chat_template": "{{ 'a' * 10**8 }}"})
        return kind, r.status_code
    r = await client.post("/v1/completions", json={"prompt": [1, 2, 10**6], "max_tokens": 2})
    return kind, r.status_code


EXPECTED = {
    "completion": {200}, "chat": {200}, "stream": {200}, "chat_stream": {200}, "leave_stream": {-1, 200},
    "leave_plain": {-1, 200}, "n4": {200}, "batch": {200}, "too_long": {400}, "malformed": {400},
    "bad_type": {400}, "oversized": {413}, "oversized_chunked": {413}, "template": {400}, "bad_ids": {400},
}  # fmt: skip


def test_soak(server_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    app, state = make_app(server_model_dir, kv_cache_memory=4 << 20, max_model_len=256, max_num_seqs=32, max_waiting=512)
    caplog.set_level(logging.WARNING)
    outcomes: dict[str, dict[int, int]] = {}

    async def worker(seed: int, base_url: str, deadline: float) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(base_url=base_url, timeout=60.0) as client:
            while time.monotonic() < deadline:
                kind, status = await _one(client, rng)
                outcomes.setdefault(kind, {}).setdefault(status, 0)
                outcomes[kind][status] += 1

    with InProcessServer(app, state) as srv:
        deadline = time.monotonic() + SOAK_SECONDS

        async def main() -> None:
            await asyncio.gather(*(worker(i, srv.base_url, deadline) for i in range(NUM_WORKERS)))

        asyncio.run(main())
        wait_until(lambda: engine_idle(state), timeout=30, what="nothing in flight")
        engine = state.async_engine.engine
        assert engine.scheduler.kv.pool.num_used == 0
        assert not engine.scheduler.requests and not engine._children
        assert state.async_engine.num_seqs_in_flight == 0 and state.admission.num_reserved == 0
        resp = httpx.post(f"{srv.base_url}/v1/completions", json={"prompt": "still there?", "max_tokens": 3}, timeout=30)
        assert resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"] == "length"

    for kind, statuses in outcomes.items():
        assert set(statuses) <= EXPECTED[kind], (kind, statuses)
    assert len(outcomes) == len(EXPECTED), sorted(outcomes)  # every kind ran
    assert sum(sum(s.values()) for s in outcomes.values()) > 100
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR or "Traceback" in r.getMessage()]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad[:5]]
