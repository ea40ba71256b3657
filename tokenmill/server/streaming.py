"""Server-sent events as OpenAI streams them.

Each chunk is one ``data: {json}`` event; the stream ends with
``data: [DONE]``. An error after the stream has started (the server aborted
the request while draining, or the engine failed) is sent as an event whose
body is the OpenAI error object, then ``[DONE]``: the official clients raise
it as an ``APIError``. JSON is rendered by ``render.dumps``, which never
fails on text the model produced.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse

from tokenmill.server.render import dumps

DONE = b"data: [DONE]\n\n"

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # Proxies (nginx) would otherwise buffer the stream and defeat it.
    "X-Accel-Buffering": "no",
}


def event(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def chunk_event(
    object_name: str,
    request_id: str,
    created: int,
    model: str,
    choice: dict[str, Any],
    usage: dict[str, Any] | None,
    include_usage: bool,
) -> bytes:
    """One streamed chunk with a single choice; ``usage`` is present (null mid-stream) when asked for."""
    obj: dict[str, Any] = {"id": request_id, "object": object_name, "created": created, "model": model, "choices": [choice]}
    if include_usage:
        obj["usage"] = usage
    return event(obj)


def sse_response(events: AsyncIterator[bytes], on_close: Callable[[], None]) -> StreamingResponse:
    """Stream ``events``; ``on_close`` runs however the stream ends (done, error, client gone).

    A client that disconnects cancels the generator (the ASGI server reports
    the disconnect); ``on_close`` then aborts whatever is still running.
    """

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in events:
                yield chunk
            yield DONE
        finally:
            on_close()

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)
