"""Clients that go away: their requests are aborted and every KV block comes back."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from tests.server.helpers import API_KEY, MODEL_NAME, ServerProcess, metric

NUM_CLIENTS = 50


def _wait_idle(server: ServerProcess, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = (
            m["tokenmill_num_requests_running"] == 0
            and m["tokenmill_num_requests_waiting"] == 0
            and m["tokenmill_num_requests_in_flight"] == 0
            and metric(m, "tokenmill_kv_blocks", state="used") == 0
        )
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def test_streaming_clients_that_drop_free_their_blocks(server: ServerProcess) -> None:
    from openai import AsyncOpenAI

    before = server.metrics()

    async def client(i: int, c: Any) -> int:
        stream = await c.completions.create(
            model=MODEL_NAME,
            prompt=f"client {i} asks for a very long answer",
            max_tokens=200,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        seen = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                seen += 1
                if seen >= 3:
                    break
        await stream.close()  # drop the connection mid-stream
        return seen

    async def main() -> list[int]:
        c = AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60.0)
        try:
            return await asyncio.gather(*(client(i, c) for i in range(NUM_CLIENTS)))
        finally:
            await c.close()

    seen = asyncio.run(main())
    assert all(s >= 1 for s in seen)
    after = _wait_idle(server)
    assert after["tokenmill_num_requests_running"] == 0
    assert after["tokenmill_num_requests_waiting"] == 0
    assert after["tokenmill_num_requests_in_flight"] == 0
    assert metric(after, "tokenmill_kv_blocks", state="used") == 0
    free = metric(after, "tokenmill_kv_blocks", state="free") + metric(after, "tokenmill_kv_blocks", state="cached")
    assert free == after["tokenmill_kv_blocks_total"]
    aborted = metric(after, "tokenmill_request_finished_total", finish_reason="abort") - metric(
        before, "tokenmill_request_finished_total", finish_reason="abort"
    )
    finished_by_length = metric(after, "tokenmill_request_finished_total", finish_reason="length") - metric(
        before, "tokenmill_request_finished_total", finish_reason="length"
    )
    # Every client left long before its 200 tokens: all were aborted, none ran to the end.
    assert aborted + finished_by_length == NUM_CLIENTS
    assert aborted >= NUM_CLIENTS * 0.8, (aborted, finished_by_length)


def test_non_streaming_client_that_times_out_is_aborted(server: ServerProcess) -> None:
    before = server.metrics()
    body = {"model": MODEL_NAME, "prompt": "a long answer please", "max_tokens": 230, "ignore_eos": True, "n": 8}
    try:
        # The client gives up long before 8 x 230 tokens are done.
        httpx.post(f"{server.base_url}/v1/completions", json=body, headers=server.headers, timeout=0.05)
    except httpx.TimeoutException:
        pass
    after = _wait_idle(server)
    assert metric(after, "tokenmill_kv_blocks", state="used") == 0
    assert after["tokenmill_num_requests_running"] == 0
    aborted = metric(after, "tokenmill_request_finished_total", finish_reason="abort") - metric(
        before, "tokenmill_request_finished_total", finish_reason="abort"
    )
    finished = metric(after, "tokenmill_request_finished_total") - metric(before, "tokenmill_request_finished_total")
    assert finished == 8
    assert aborted >= 1
