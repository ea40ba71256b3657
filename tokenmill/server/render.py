"""JSON rendering that never fails on what a model or a client produced.

Starlette's ``JSONResponse`` encodes with ``ensure_ascii=False`` and raises
on a lone surrogate; a server must not answer 500 because a token decoded
badly. ``dumps`` falls back to ASCII escapes, which are valid JSON for any
string.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse as _StarletteJSONResponse


def dumps(obj: Any) -> bytes:
    """Compact JSON in UTF-8; escapes text that is not valid Unicode rather than failing."""
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class JSONResponse(_StarletteJSONResponse):
    """Starlette's JSON response (FastAPI documents routes that use it as JSON), rendered by ``dumps``."""

    def render(self, content: Any) -> bytes:
        return dumps(content)
