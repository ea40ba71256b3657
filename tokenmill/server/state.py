"""What every handler needs: the async engine, a tokenizer, the settings, the metrics, the bounds.

Also how a handler's work ends with its client: ``unless_disconnected`` runs
a handler and cancels it when the client goes (its requests are aborted,
its queued prompt work dropped), and ``collect`` runs a non-streaming
request to the end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response

from tokenmill.core.scheduler import QueueFullError
from tokenmill.lora.errors import LoraNotFoundError
from tokenmill.server.admission import Admission, Reservation
from tokenmill.server.async_engine import AsyncEngine, EngineDeadError, RequestStream
from tokenmill.server.defaults import (
    DEFAULT_CHAT_TEMPLATE_TIMEOUT_S,
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_PROMPTS_PER_REQUEST,
    DEFAULT_PREPROCESS_THREADS,
    DEFAULT_RETRY_AFTER_S,
)
from tokenmill.server.errors import APIError
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.prompts import Preprocessor, PromptLimits

T = TypeVar("T")


@dataclass
class ServerSettings:
    served_model_names: list[str]
    api_key: str | None = None
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S
    retry_after_s: int = DEFAULT_RETRY_AFTER_S
    # Run chat templates sent with requests (they are code; the sandbox bounds them, the operator decides).
    trust_request_chat_template: bool = False
    chat_template_timeout: float = DEFAULT_CHAT_TEMPLATE_TIMEOUT_S
    max_prompt_chars: int | None = None  # None: the context length x DEFAULT_CHARS_PER_TOKEN
    max_prompts_per_request: int = DEFAULT_MAX_PROMPTS_PER_REQUEST
    # Host header values taken (DNS-rebinding protection); None: any. See hosts.py.
    allowed_hosts: list[str] | None = None
    preprocess_threads: int = DEFAULT_PREPROCESS_THREADS
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's runtime LoRA updates)
    enable_lora_runtime_updates: bool = False
    # How tool calls are read from the model's text (tool_choice auto); None: auto is refused.
    tool_call_parser: str | None = "hermes"


@dataclass
class ServerState:
    async_engine: AsyncEngine
    tokenizer: Any  # the server's own instance: the engine thread decodes with another
    settings: ServerSettings
    metrics: ServerMetrics
    max_model_len: int
    vocab_size: int
    created: int
    limits: PromptLimits
    admission: Admission
    preprocessor: Preprocessor
    draining: bool = False
    # LoRA adapters served as models, by name -> their registered path (event-loop view;
    # the engine's registry decides, see lora_for)
    loras: dict[str, str] = field(default_factory=dict)
    # Set by the runner: a drain was asked for (SIGTERM) and is in progress.
    drain_task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def model_name(self) -> str:
        return self.settings.served_model_names[0]

    def check_model(self, requested: str | None) -> str:
        """The model a request names: a served name of the base or a LoRA adapter's (404 else)."""
        if requested is None or requested in self.settings.served_model_names or requested in self.loras:
            return requested or self.model_name
        raise APIError(
            404,
            f"The model {requested!r} does not exist. Served: "
            f"{', '.join([*self.settings.served_model_names, *self.loras])}",
            param="model",
            code="model_not_found",
        )

    def lora_for(self, model: str) -> str | None:
        """The adapter name to run ``model`` (from ``check_model``) with; None for the base."""
        return model if model in self.loras and model not in self.settings.served_model_names else None

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
        except LoraNotFoundError as exc:  # unloaded since check_model
            raise APIError(404, str(exc), param="model", code="model_not_found") from None
        except ValueError as exc:
            raise APIError(400, str(exc)) from None

    async def add_all(
        self,
        request_id: str,
        prompts: list[list[int]],
        params: list[Any],
        reservation: Reservation,
        **kwargs: Any,
    ) -> tuple[RequestStream, list[str]]:
        """Add one engine request per prompt into one stream; all or none.

        The admission ``reservation`` passes to the engine's count as the
        requests are queued. Returns the stream and the engine request ids
        (``{request_id}-{i}`` for several prompts).
        """
        stream = RequestStream()
        ids = [request_id if len(prompts) == 1 else f"{request_id}-{i}" for i in range(len(prompts))]
        with self.engine_errors():
            await self.async_engine.add_requests(
                list(zip(ids, prompts, params, strict=True)), stream, on_queued=reservation.release, **kwargs
            )
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


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T | Response:
    """Run a handler; if the client goes first, cancel it (499, which nobody reads).

    Cancelling stops the handler wherever it is: its prompt work on the
    pool, its adds to the engine (aborted), a non-streaming collect
    (aborted). A stream already returned watches its client itself.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task.cancelled():
        return Response(status_code=499)
    return task.result()


async def collect(state: ServerState, stream: RequestStream) -> dict[str, Any]:
    """Run a non-streaming request to the end; returns the last (cumulative) output of each engine request.

    If the caller is cancelled (the client left), what is still running is aborted.
    """
    final: dict[str, Any] = {}
    try:
        with state.engine_errors():
            async for out in stream:
                final[out.request_id] = out
    except asyncio.CancelledError:
        state.abort(stream)
        raise
    return final
