"""The FastAPI app: OpenAI routes, health, metrics; and how to build it around an engine.

Routes:

- ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or SSE)
- ``GET /v1/models``
- ``GET /health``: 200 while the engine runs; 503 when it has failed or the
  server is draining
- ``GET /metrics``: Prometheus text format

The app is a thin shell (DESIGN.md principle 5): it validates, tokenizes,
hands requests to the ``AsyncEngine`` and renders what comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from tokenmill.server.async_engine import AsyncEngine
from tokenmill.server.chat import create_chat_completion
from tokenmill.server.completions import create_completion
from tokenmill.server.errors import error_response, install_error_handlers
from tokenmill.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from tokenmill.server.middleware import GuardMiddleware
from tokenmill.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelList,
)
from tokenmill.server.render import JSONResponse
from tokenmill.server.state import ServerSettings, ServerState

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)
}


def build_state(engine: Any, settings: ServerSettings, tokenizer: Any = None) -> ServerState:
    """Wrap a constructed ``Engine`` for serving; the engine thread starts with the app."""
    if tokenizer is None:
        from transformers import AutoTokenizer

        # A tokenizer of the server's own: the engine thread decodes with its
        # instance while handlers encode, and the two must not share state.
        tokenizer = AutoTokenizer.from_pretrained(
            engine.config.tokenizer or engine.model_path, local_files_only=True, trust_remote_code=False
        )
    metrics = ServerMetrics(settings.served_model_names[0])
    return ServerState(
        async_engine=AsyncEngine(engine, metrics),
        tokenizer=tokenizer,
        settings=settings,
        metrics=metrics,
        max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size,
        model_root=str(engine.model_path),
        created=int(time.time()),
    )


async def drain(state: ServerState, timeout: float) -> int:
    """Stop taking requests, let in-flight ones finish for ``timeout`` s, abort the rest.

    Returns how many requests had to be aborted.
    """
    state.draining = True
    engine = state.async_engine
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(0.0, timeout)
    while engine.num_in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    aborted = engine.num_in_flight
    if aborted:
        engine.abort_all()
        # Give the aborted streams a moment to send their final event.
        flush_deadline = loop.time() + 2.0
        while engine.num_in_flight and loop.time() < flush_deadline:
            await asyncio.sleep(0.02)
    return aborted


def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.async_engine.start()
        try:
            yield
        finally:
            await state.async_engine.stop()

    app = FastAPI(
        title="tokenmill",
        summary="OpenAI-compatible LLM serving",
        lifespan=lifespan,
        default_response_class=JSONResponse,
    )
    app.state.tokenmill = state
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, get_state=lambda: state)

    @app.post("/v1/completions", responses={200: {"model": CompletionResponse}, **_ERRORS})
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return _json(await create_completion(state, body, request))

    @app.post("/v1/chat/completions", responses={200: {"model": ChatCompletionResponse}, **_ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return _json(await create_chat_completion(state, body, request))

    @app.get("/v1/models", responses={200: {"model": ModelList}})
    async def models() -> Any:
        cards = [
            {
                "id": name,
                "object": "model",
                "created": state.created,
                "owned_by": "tokenmill",
                "root": state.model_root,
                "max_model_len": state.max_model_len,
            }
            for name in state.settings.served_model_names
        ]
        return JSONResponse({"object": "list", "data": cards})

    @app.get("/health")
    async def health() -> Any:
        if state.async_engine.dead is not None:
            return error_response(503, f"the engine is not running: {state.async_engine.dead}", code="engine_unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _json(result: Any) -> Any:
    return JSONResponse(result) if isinstance(result, dict) else result
