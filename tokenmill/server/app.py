"""The FastAPI app: OpenAI routes, health, metrics; and how to build it around an engine.

Routes:

- ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or SSE)
- ``GET /v1/models``: the base model's served names, then each LoRA adapter
  (``parent``: the base)
- ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter`` (vLLM's
  bodies and plain-text answers), only with ``enable_lora_runtime_updates``
- ``GET /health``: 200 while the engine runs; 503 when it has failed or the
  server is draining
- ``GET /metrics``: Prometheus text format

The published OpenAPI schema (``/openapi.json``) is kept true by a
schemathesis run in the tests: every body the routes send validates against
the models declared here.

The app is a thin shell (DESIGN.md principle 5): it validates, tokenizes,
hands requests to the ``AsyncEngine`` and renders what comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse, Response
from pydantic.json_schema import models_json_schema

from tokenmill.server.admission import Admission
from tokenmill.server.async_engine import AsyncEngine
from tokenmill.server.chat import create_chat_completion
from tokenmill.server.completions import create_completion
from tokenmill.server.defaults import DEFAULT_CHARS_PER_TOKEN
from tokenmill.server.errors import APIError, error_response, install_error_handlers
from tokenmill.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from tokenmill.server.middleware import GuardMiddleware
from tokenmill.server.prompts import Preprocessor, PromptLimits
from tokenmill.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    HealthResponse,
    LoadLoraAdapterRequest,
    ModelList,
    UnloadLoraAdapterRequest,
)
from tokenmill.server.render import JSONResponse
from tokenmill.server.state import ServerSettings, ServerState, unless_disconnected


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


# Every route may answer these: the Host check (421) and the drain (503) run before any route.
_GUARD_ERRORS = (421, 503)
_POST_ERRORS = _errors(400, 401, 404, 413, 429, *_GUARD_ERRORS)


def _event_stream(chunk_model: str) -> dict[str, Any]:
    """The ``text/event-stream`` alternative of a streaming route: each event's data is a chunk, an error, or [DONE].

    ``itemSchema`` describes one event, as FastAPI writes it for its own
    event streams (OpenAPI 3.2's field).
    """
    chunk = {"anyOf": [{"$ref": f"#/components/schemas/{chunk_model}"}, {"$ref": "#/components/schemas/ErrorResponse"}]}
    data = {
        "oneOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json", "contentSchema": chunk},
        ]
    }
    item = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": data, "event": {"type": "string"}, "id": {"type": "string"}},
        "description": "with stream=true: one chunk per 'data: {json}' event, then 'data: [DONE]'",
    }
    return {"text/event-stream": {"itemSchema": item}}


def build_state(engine: Any, settings: ServerSettings, tokenizer: Any = None) -> ServerState:
    """Wrap a constructed ``Engine`` for serving; the engine thread starts with the app."""
    if tokenizer is None:
        from transformers import AutoTokenizer

        # A tokenizer of the server's own: the engine thread decodes with its
        # instance while handlers encode, and the two must not share state.
        tokenizer = AutoTokenizer.from_pretrained(
            engine.config.tokenizer or engine.model_path, local_files_only=True, trust_remote_code=False
        )
    if engine.tokenizer is not None:
        # The structured-output compiler reads the engine's tokenizer once, here, before the
        # engine thread uses it; the pool threads then compile against its own vocabulary.
        try:
            engine.grammar_compiler  # noqa: B018 - built on first access
        except Exception as exc:  # noqa: BLE001 - a tokenizer xgrammar cannot read: no structured output
            logging.getLogger("tokenmill.server").warning("structured output unavailable: %s", exc)
    metrics = ServerMetrics(settings.served_model_names[0])
    async_engine = AsyncEngine(engine, metrics)
    return server_state(async_engine, metrics, tokenizer, settings, max_model_len=engine.max_model_len,
                        vocab_size=engine.vocab_size, max_waiting=engine.config.max_waiting,
                        max_running=engine.config.max_num_seqs,
                        loras={lora.lora_name: lora.lora_path for lora in engine.loras.list()})  # fmt: skip


def server_state(async_engine: Any, metrics: ServerMetrics, tokenizer: Any, settings: ServerSettings, *,
                 max_model_len: int, vocab_size: int, max_waiting: int | None, max_running: int,
                 loras: dict[str, str] | None = None) -> ServerState:  # fmt: skip
    """The state of an app serving ``async_engine`` (an ``AsyncEngine``, or a cluster's front
    end with the same face); ``max_waiting`` and ``max_running`` bound what admission lets in;
    ``loras``: the LoRA adapters served, by name (their paths)."""
    # One encode now, on this thread: a fast tokenizer whose file sets truncation
    # clears it on first use, and that must not happen on two pool threads at once.
    tokenizer("warm up", add_special_tokens=True)
    max_chars = settings.max_prompt_chars or max_model_len * DEFAULT_CHARS_PER_TOKEN
    return ServerState(
        async_engine=async_engine,
        tokenizer=tokenizer,
        settings=settings,
        metrics=metrics,
        max_model_len=max_model_len,
        vocab_size=vocab_size,
        created=int(time.time()),
        limits=PromptLimits(
            max_model_len=max_model_len,
            max_chars=max_chars,
            max_prompts=settings.max_prompts_per_request,
            vocab_size=vocab_size,
            template_timeout_s=settings.chat_template_timeout,
        ),
        admission=Admission(async_engine, max_waiting, max_running, metrics, settings.retry_after_s),
        preprocessor=Preprocessor(settings.preprocess_threads),
        loras=dict(loras or {}),
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
            state.preprocessor.shutdown()

    app = FastAPI(
        title="tokenmill",
        summary="OpenAI-compatible LLM serving",
        lifespan=lifespan,
        default_response_class=JSONResponse,
    )
    app.state.tokenmill = state
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, get_state=lambda: state)

    # Handlers return JSONResponse(dict) rather than the response models: the
    # models document the bodies (response_model), and tests check that real
    # bodies validate against them; building them per request would cost time.
    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={200: {"content": _event_stream("CompletionResponse")}, **_POST_ERRORS},
    )
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return _json(await unless_disconnected(request, create_completion(state, body, request)))

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses={200: {"content": _event_stream("ChatCompletionChunk")}, **_POST_ERRORS},
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return _json(await unless_disconnected(request, create_chat_completion(state, body, request)))

    @app.get("/v1/models", response_model=ModelList, responses=_errors(401, *_GUARD_ERRORS))
    async def models() -> Any:
        cards = [
            {
                "id": name,
                "object": "model",
                "created": state.created,
                "owned_by": "tokenmill",
                # The served name, not the path on the server's disk (vLLM shows the path).
                "root": name,
                "max_model_len": state.max_model_len,
            }
            for name in state.settings.served_model_names
        ]
        cards += [
            {
                "id": name,
                "object": "model",
                "created": state.created,
                "owned_by": "tokenmill",
                "root": name,
                "parent": state.model_name,
                "max_model_len": state.max_model_len,
            }
            for name in state.loras
        ]
        return JSONResponse({"object": "list", "data": cards})

    if state.settings.enable_lora_runtime_updates:
        _lora_routes(app, state)

    @app.get("/health", response_model=HealthResponse, responses=_errors(*_GUARD_ERRORS))
    async def health() -> Any:
        if state.async_engine.dead is not None:
            return error_response(503, f"the engine is not running: {state.async_engine.dead}", code="engine_unavailable")
        return JSONResponse({"status": "ok"})

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                         "description": "Prometheus text exposition format"}, **_errors(421)},
    )  # fmt: skip
    async def metrics() -> Response:
        await state.async_engine.collect_metrics()
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _lora_routes(app: FastAPI, state: ServerState) -> None:
    """vLLM's runtime LoRA updates: load or unload an adapter by name while serving."""
    text = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "done"}}

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
              responses={**text, **_errors(400, 401, *_GUARD_ERRORS)})  # fmt: skip
    async def load_lora_adapter(body: LoadLoraAdapterRequest) -> Any:
        name = body.lora_name
        if name in state.settings.served_model_names:
            raise APIError(400, f"{name!r} is the base model's name; choose another for the adapter", param="lora_name")
        if name in state.loras:
            raise APIError(400, f"The lora adapter {name!r} has already been loaded.", param="lora_name")
        with state.engine_errors():  # a bad adapter is a 400 naming what is wrong
            lora = await state.async_engine.call(lambda engine: engine.add_lora(name, body.lora_path))
        state.loras[name] = lora.lora_path
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
              responses={**text, **_errors(400, 401, 404, *_GUARD_ERRORS)})  # fmt: skip
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> Any:
        name = body.lora_name
        if name not in state.loras:
            raise APIError(404, f"The lora adapter {name!r} cannot be found.", param="lora_name", code="model_not_found")
        state.loras.pop(name)  # new requests for it get 404 from now on
        with state.engine_errors():
            await state.async_engine.call(lambda engine: engine.remove_lora(name))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, without the 422 it adds to every route with a body (schema errors are 400
    here), with the models that only streamed events use."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        _, defs = models_json_schema(
            [(ChatCompletionChunk, "serialization")], ref_template="#/components/schemas/{model}"
        )
        for name, definition in defs.get("$defs", {}).items():
            components.setdefault(name, definition)
        app.openapi_schema = schema
    return app.openapi_schema


def _json(result: Any) -> Any:
    return JSONResponse(result) if isinstance(result, dict) else result
