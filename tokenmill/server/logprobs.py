"""Logprobs in the two shapes OpenAI uses: completions (parallel lists) and chat (per-token objects)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tokenmill.outputs import Logprob, TokenLogprobs
from tokenmill.server.params import clamp_logprob


def _top(entry: TokenLogprobs, num_top: int) -> list[tuple[int, Logprob]]:
    ranked = [(tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= num_top]
    ranked.sort(key=lambda item: item[1].rank or 0)
    return ranked


def _token_text(lp: Logprob) -> str:
    return lp.decoded_token if lp.decoded_token is not None else ""


def completion_logprobs(
    token_ids: list[int],
    logprobs: list[TokenLogprobs | None],
    num_top: int,
    text_offset: int,
    decode: Callable[[int], str] | None = None,
) -> tuple[dict[str, Any], int]:
    """The ``logprobs`` object of a completion choice; returns it and the next text offset.

    ``top_logprobs`` holds the ``num_top`` most likely tokens plus the sampled
    one (as vLLM does), keyed by their text. An entry of None (the first
    prompt token under ``echo``) gives a null logprob and null top_logprobs;
    its text comes from ``decode``.
    """
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for tid, entry in zip(token_ids, logprobs, strict=False):
        if entry is None:
            text = decode(tid) if decode is not None else ""
            tokens.append(text)
            token_logprobs.append(None)
            top_logprobs.append(None)
            offsets.append(text_offset)
            text_offset += len(text)
            continue
        sampled = entry.get(tid)
        text = _token_text(sampled) if sampled is not None else ""
        tokens.append(text)
        token_logprobs.append(clamp_logprob(sampled.logprob) if sampled is not None else None)
        top = {_token_text(lp): clamp_logprob(lp.logprob) for _, lp in _top(entry, num_top)}
        if sampled is not None:
            top.setdefault(text, clamp_logprob(sampled.logprob))
        top_logprobs.append(top)
        offsets.append(text_offset)
        text_offset += len(text)
    body = {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens, "top_logprobs": top_logprobs}
    return body, text_offset


def _chat_entry(lp: Logprob) -> dict[str, Any]:
    text = _token_text(lp)
    return {"token": text, "logprob": clamp_logprob(lp.logprob), "bytes": list(text.encode("utf-8", "replace"))}


def chat_logprobs(token_ids: list[int], logprobs: list[TokenLogprobs], num_top: int) -> dict[str, Any]:
    """The ``logprobs`` object of a chat choice: ``{"content": [...]}``."""
    content = []
    for tid, entry in zip(token_ids, logprobs, strict=False):
        sampled = entry.get(tid)
        item = _chat_entry(sampled) if sampled is not None else {"token": "", "logprob": None, "bytes": []}
        item["top_logprobs"] = [_chat_entry(lp) for _, lp in _top(entry, num_top)]
        content.append(item)
    return {"content": content}
