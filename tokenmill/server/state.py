"""What every handler needs: the async engine, a tokenizer, the settings and the metrics."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from tokenmill.core.scheduler import QueueFullError
from tokenmill.server.async_engine import AsyncEngine, EngineDeadError, RequestStream
from tokenmill.server.defaults import (
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_RETRY_AFTER_S,
)
from tokenmill.server.errors import APIError
from tokenmill.server.metrics import ServerMetrics


@dataclass
class ServerSettings:
    served_model_names: list[str]
    api_key: str | None = None
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S
    retry_after_s: int = DEFAULT_RETRY_AFTER_S


@dataclass
class ServerState:
    async_engine: AsyncEngine
    tokenizer: Any  # the server's own instance: the engine thread decodes with another
    settings: ServerSettings
    metrics: ServerMetrics
    max_model_len: int
    vocab_size: int
    model_root: str
    created: int
    draining: bool = False
    # Set by the runner: a drain was asked for (SIGTERM) and is in progress.
    drain_task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def model_name(self) -> str:
        return self.settings.served_model_names[0]

    def check_model(self, requested: str | None) -> str:
        if requested is None or requested in self.settings.served_model_names:
            return requested or self.model_name
        raise APIError(
            404,
            f"The model {requested!r} does not exist. Served: {', '.join(self.settings.served_model_names)}",
            param="model",
            code="model_not_found",
        )

    @staticmethod
    def client_id(request: Request, user: str | None) -> str:
        """Fairness identity: the ``X-Client-Id`` header, else the body's ``user``."""
        return request.headers.get("x-client-id") or user or ""

    @contextlib.contextmanager
    def engine_errors(self) -> Iterator[None]:
        """Map engine refusals to HTTP errors."""
        try:
            yield
        except QueueFullError as exc:
            self.metrics.reject("queue_full")
            raise APIError(
                429,
                f"{exc}; retry later",
                code="queue_full",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            ) from None
        except EngineDeadError as exc:
            raise APIError(503, str(exc), code="engine_unavailable") from None
        except ValueError as exc:
            raise APIError(400, str(exc)) from None

    async def add_all(
        self, request_id: str, prompts: list[list[int]], params: list[Any], **kwargs: Any
    ) -> tuple[RequestStream, list[str]]:
        """Add one engine request per prompt into one stream; all or none.

        Returns the stream and the engine request ids (``{request_id}-{i}``
        for several prompts).
        """
        stream = RequestStream()
        ids = [request_id if len(prompts) == 1 else f"{request_id}-{i}" for i in range(len(prompts))]
        added: list[str] = []
        try:
            with self.engine_errors():
                for rid, ids_i, params_i in zip(ids, prompts, params, strict=True):
                    await self.async_engine.add_request(rid, ids_i, params_i, stream=stream, **kwargs)
                    added.append(rid)
        except BaseException:
            for rid in added:
                self.async_engine.abort(rid)
            raise
        return stream, ids

    def abort(self, stream: RequestStream) -> None:
        for rid in list(stream.pending):
            self.async_engine.abort(rid)


async def wait_for_disconnect(request: Request) -> None:
    """Return once the client has gone away (the body is read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(state: ServerState, stream: RequestStream, request: Request) -> dict[str, Any] | None:
    """Run a non-streaming request to the end; None if the client left first (it is aborted).

    Returns the last (cumulative) output of each engine request.
    """
    final: dict[str, Any] = {}

    async def consume() -> None:
        async for out in stream:
            final[out.request_id] = out

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            consumer.cancel()
            state.abort(stream)
    if consumer not in done:
        return None
    with state.engine_errors():
        consumer.result()  # re-raise an engine failure
    return final


@contextlib.asynccontextmanager
async def aborting(state: ServerState, stream: RequestStream) -> AsyncIterator[None]:
    """Abort what is still running in ``stream`` however the block ends."""
    try:
        yield
    finally:
        if not stream.finished:
            state.abort(stream)
