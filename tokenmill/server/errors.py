"""Every error the server returns, in OpenAI's shape.

``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`` with
the status codes OpenAI uses:

=====  ===========================  ==========================================
 400   ``invalid_request_error``    invalid JSON, wrong types or ranges (schema
                                    errors included: tokenmill maps pydantic's
                                    422 to 400, as OpenAI does); by code:
                                    ``context_length_exceeded`` (prompt +
                                    max_tokens, or prompt characters, over the
                                    limit), ``too_many_prompts``,
                                    ``request_too_large`` (more sequences than
                                    the queue holds), ``untrusted_chat_template``,
                                    ``chat_template_limit``, ``chat_template_error``
 401   ``authentication_error``     ``--api-key`` set and no valid Bearer token
 404   ``not_found_error``          unknown model or route
 405   ``invalid_request_error``    wrong method for a route
 413   ``invalid_request_error``    body over ``--max-body-bytes`` (code ``body_too_large``)
 421   ``invalid_request_error``    a ``Host`` header the server does not answer to
                                    (DNS-rebinding protection, ``--allowed-hosts``)
 429   ``rate_limit_error``         the waiting queue is full (``--max-queue``),
                                    with a ``Retry-After`` header
 503   ``service_unavailable``      draining after SIGTERM, or the engine failed
 500   ``internal_server_error``    a bug: never for bad input
=====  ===========================  ==========================================
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.server.render import JSONResponse

logger = logging.getLogger("tokenmill.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    421: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error with an HTTP status that handlers raise and the app renders."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_body(message, _TYPES.get(status, "invalid_request_error"), param, code)
    return JSONResponse(body, status_code=status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _param_name(loc: tuple[Any, ...]) -> str | None:
    # FastAPI prefixes body errors with "body"; a union adds the member's type name.
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) if parts else None


# pydantic's error types for a body that is not an object (a list, a number, raw bytes)
_NOT_AN_OBJECT = ("model_attributes_type", "dict_type", "model_type")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") in _NOT_AN_OBJECT:
        # also what a body sent without a JSON content type looks like: FastAPI hands over bytes
        return "the request body must be a JSON object sent as Content-Type: application/json", None
    param = _param_name(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value"))
    text = f"{param}: {msg}" if param else msg
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return text, param


def install_error_handlers(app: FastAPI) -> None:
    """Render every exception in OpenAI's error shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail) if exc.detail else "error"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        # 413 comes from a chunked body growing past the limit (middleware.py)
        code = "body_too_large" if exc.status_code == 413 else None
        return error_response(exc.status_code, message, code=code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}")
