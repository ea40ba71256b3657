"""Checks that run before any route: the Host header, draining, the API key, the body size.

One pure ASGI middleware rather than three ``BaseHTTPMiddleware``s: it adds
no task per request and does not buffer streamed responses.

- A ``Host`` header the server does not answer to gets 421 (DNS-rebinding
  protection; see ``hosts.py``), on every route.
- While draining (after SIGTERM) every new request gets 503, except
  ``/metrics`` so that the drain can be watched.
- With an API key, routes under ``/v1/`` need ``Authorization: Bearer KEY``;
  ``/health`` and ``/metrics`` stay open for probes and scrapers.
- A body over the limit gets 413: at once when ``Content-Length`` says so,
  or as soon as a chunked body grows past it.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.server.errors import error_response
from tokenmill.server.hosts import host_allowed
from tokenmill.server.state import ServerState


class GuardMiddleware:
    def __init__(self, app: ASGIApp, get_state: Callable[[], ServerState | None]) -> None:
        self.app = app
        self.get_state = get_state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.get_state() if scope["type"] == "http" else None
        if state is None:
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        settings = state.settings
        if settings.allowed_hosts is not None:
            raw = _header(scope, b"host")
            host = None if raw is None else raw.decode("latin-1")
            if not host_allowed(host, settings.allowed_hosts):
                state.metrics.reject("invalid_host")
                response = error_response(
                    421,
                    f"this server does not answer to Host {host!r} (protection against DNS rebinding: on "
                    "loopback without an API key it takes only loopback names); start it with "
                    "--allowed-hosts NAME to allow others",
                    code="invalid_host",
                )
                await response(scope, receive, send)
                return
        if state.draining and path != "/metrics":
            response = error_response(503, "the server is shutting down", code="draining")
            await response(scope, receive, send)
            return
        if settings.api_key and path.startswith("/v1/") and not _authorized(scope, settings.api_key):
            state.metrics.reject("unauthorized")
            response = error_response(
                401,
                "invalid or missing API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        limit = settings.max_body_bytes
        if limit is not None:
            length = _content_length(scope)
            if length is not None and length > limit:
                state.metrics.reject("body_too_large")
                response = error_response(413, _too_large(limit), code="body_too_large")
                await response(scope, receive, send)
                return
            receive = _limited(receive, limit, lambda: state.metrics.reject("body_too_large"))
        await self.app(scope, receive, send)


def _too_large(limit: int) -> str:
    return f"the request body is larger than the server's limit of {limit} bytes"


def _limited(receive: Receive, limit: int, on_reject: Callable[[], None]) -> Receive:
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                on_reject()
                # The framework re-raises HTTPException from body parsing; the
                # app's handler renders it in the error shape.
                raise HTTPException(413, _too_large(limit))
        return message

    return wrapped


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


def _content_length(scope: Scope) -> int | None:
    raw = _header(scope, b"content-length")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _authorized(scope: Scope, api_key: str) -> bool:
    raw = _header(scope, b"authorization")
    if raw is None:
        return False
    scheme, _, token = raw.decode("latin-1").partition(" ")
    # Constant-time comparison: the key must not leak through response timing.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())
