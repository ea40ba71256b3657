"""The load generator of ``tokenmill bench serve``: streaming OpenAI requests, timed per chunk.

Each request is sent with ``stream: true`` and ``stream_options.include_usage``
so that token counts come from the server. Times are taken as chunks arrive:
TTFT at the first chunk with text, one inter-token latency (ITL) per later
chunk with text (a server that sends several tokens in one chunk shows one
gap, as ``vllm bench serve`` counts it), E2E at the end of the stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tokenmill.bench.serve_workloads import BenchRequest


@dataclass
class RequestResult:
    success: bool = False
    error: str | None = None
    start: float = 0.0  # seconds since the benchmark started
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # seconds since the benchmark started
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    text_len: int = 0

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass
class ClientConfig:
    base_url: str
    model: str
    endpoint: str = "completions"  # or "chat"
    api_key: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = True
    timeout_s: float = 600.0
    extra_body: dict[str, Any] = field(default_factory=dict)


def request_body(cfg: ClientConfig, req: BenchRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": req.output_len,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True  # tokenmill and vLLM extra: answers as long as asked
    if cfg.endpoint == "chat":
        messages = [{"role": "system", "content": req.system}] if req.system else []
        messages.append({"role": "user", "content": req.prompt})
        body["messages"] = messages
    else:
        body["prompt"] = (req.system + "\n" if req.system else "") + req.prompt
    body.update(cfg.extra_body)
    return body


def endpoint_url(cfg: ClientConfig) -> str:
    path = "chat/completions" if cfg.endpoint == "chat" else "completions"
    return f"{cfg.base_url.rstrip('/')}/{path}"


async def send_one(
    session: aiohttp.ClientSession, cfg: ClientConfig, req: BenchRequest, t0: float
) -> RequestResult:
    """Send one streaming request; never raises (failures are recorded)."""
    res = RequestResult(start=time.perf_counter() - t0)
    headers = {"Content-Type": "application/json"}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    sent = time.perf_counter()
    last = sent
    chat = cfg.endpoint == "chat"
    try:
        async with session.post(endpoint_url(cfg), json=request_body(cfg, req), headers=headers) as resp:
            if resp.status != 200:
                text = await resp.text()
                res.error = f"HTTP {resp.status}: {text[:300]}"
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"].get("message", chunk["error"]))
                    return res
                usage = chunk.get("usage")
                if usage:
                    res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    res.output_tokens = int(usage.get("completion_tokens") or 0)
                    details = usage.get("prompt_tokens_details") or {}
                    res.cached_tokens = int(details.get("cached_tokens") or 0)
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if not text:
                        continue
                    now = time.perf_counter()
                    if res.ttft is None:
                        res.ttft = now - sent
                    else:
                        res.itl.append(now - last)
                    last = now
                    res.chunk_times.append(now - t0)
                    res.text_len += len(text)
            res.e2e = time.perf_counter() - sent
            if res.output_tokens == 0:
                res.output_tokens = len(res.chunk_times)  # a server without usage in streams
            res.success = res.ttft is not None
            if not res.success:
                res.error = "the stream carried no text"
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError, ValueError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def run_load(
    cfg: ClientConfig,
    requests: list[BenchRequest],
    send_times: list[float],
    max_concurrency: int | None,
    on_done: Callable[[RequestResult], None] | None = None,
) -> tuple[list[RequestResult], float]:
    """Send ``requests`` open-loop at ``send_times`` (seconds); returns results and the duration.

    With ``max_concurrency`` a request whose send time has come waits for a
    free slot, so the offered load is capped (closed loop when every send
    time is 0).
    """
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0, force_close=False)
    results: list[RequestResult | None] = [None] * len(requests)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            delay = send_times[i] - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is None:
                res = await send_one(session, cfg, requests[i], t0)
            else:
                async with sem:
                    res = await send_one(session, cfg, requests[i], t0)
            results[i] = res
            if on_done is not None:
                on_done(res)

        await asyncio.gather(*(one(i) for i in range(len(requests))))
        duration = time.perf_counter() - t0
    return [r if r is not None else RequestResult(error="not sent") for r in results], duration
