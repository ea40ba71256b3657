"""Driving a ``ClusterEngine`` from a test: run requests to the end on its own event loop."""

from __future__ import annotations

import asyncio
from typing import Any

from tokenmill.core.request import SamplingParams
from tokenmill.server.async_engine import RequestStream


async def run_one(engine: Any, rid: str, prompt: list[int], params: SamplingParams, **kw: Any) -> list[Any]:
    """Add one request and collect every output it streams."""
    stream = RequestStream()
    await engine.add_requests([(rid, prompt, params)], stream, **kw)
    return [out async for out in stream]


def run_all(engine: Any, requests: list[tuple[str, list[int], SamplingParams]], *, after: Any = None) -> dict[str, list[Any]]:
    """Start ``engine``, add every request at once, wait for all; ``after(engine)`` runs (awaited) before it stops."""

    async def main() -> dict[str, list[Any]]:
        engine.start()
        try:
            outs = await asyncio.wait_for(asyncio.gather(*(run_one(engine, *r) for r in requests)), timeout=120)
            if after is not None:
                await after(engine)
            return {r[0]: o for r, o in zip(requests, outs, strict=True)}
        finally:
            await engine.stop()

    return asyncio.run(main())


def final_tokens(outs: list[Any]) -> list[int]:
    """The tokens a streaming client assembled from the deltas (equal to the last output's)."""
    streamed = [t for o in outs for t in o.outputs[0].delta_token_ids]
    assert streamed == outs[-1].outputs[0].token_ids
    return streamed
