"""Speculative decoding proposers: where draft tokens come from (the executor's side).

``--speculative`` names one:

- ``ngram``: prompt lookup in the request's own tokens (``ngram.py``);
- ``draft:PATH``: a small model that shares the target's tokenizer, with its own
  paged KV on the target's block tables (``draft_model.py``); ``draft:default``
  is the bundled default model's draft (``tokenmill/models/default_draft``);
- ``self-int8``: the target's own weights quantized to int8 with the existing
  kernels (``self_int8.py``): about a quarter of the bytes, high acceptance.

The scheduler decides how many drafts each request verifies and proposes
(``core/spec.py``); the executor runs the proposer after sampling and verifies
drafts (``verify.py``). A proposer offers ``propose(items)``, ``draft_probs``
(the distribution a draft was sampled from, or None for deterministic drafts),
``reset`` / ``drop`` for per-request state, ``draft_cost`` (one draft step over
one target decode step) and ``writes_kv``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

METHODS = ("ngram", "draft:PATH", "draft:default", "self-int8")

# The most drafts per step with --num-speculative-tokens auto (the controller picks fewer).
AUTO_MAX_TOKENS = 8


@dataclass(slots=True)
class ProposeItem:
    """One request to propose for: its tokens now (prompt and output), how many drafts, its blocks."""

    request_id: str
    token_ids: list[int]
    num: int
    blocks: list[int]
    setup: Any  # the request's SeqSetup (sampling parameters, prompt, seed)


def parse_speculative(text: str) -> tuple[str, str | None]:
    """``("ngram" | "draft" | "self-int8", draft path or None)``; ``ValueError`` for anything else."""
    if text in ("ngram", "self-int8"):
        return text, None
    if text.startswith("draft:") and len(text) > len("draft:"):
        path = text[len("draft:") :]
        if path == "default":
            from tokenmill.models import DEFAULT_DRAFT_PATH

            return "draft", str(DEFAULT_DRAFT_PATH)
        return "draft", path
    raise ValueError(f"unknown speculative method {text!r}; use one of: {', '.join(METHODS)}")


def parse_num_speculative_tokens(text: str | int | None) -> int | None:
    """``K`` (>= 1) for a fixed draft length, None for ``auto`` (adaptive)."""
    if text is None or text == "auto":
        return None
    try:
        k = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"num_speculative_tokens must be an integer >= 1 or 'auto', got {text!r}") from None
    if k < 1:
        raise ValueError(f"num_speculative_tokens must be >= 1 (or 'auto'), got {k}")
    return k


def make_proposer(text: str, target: Any, target_path: str | Path) -> Any:
    """The proposer ``text`` names, for the ``ModelExecutor`` ``target`` loaded from ``target_path``."""
    method, path = parse_speculative(text)
    if method == "ngram":
        from tokenmill.spec.ngram import NgramProposer

        return NgramProposer()
    if method == "self-int8":
        from tokenmill.spec.self_int8 import SelfInt8Proposer

        return SelfInt8Proposer(target_path, target=target)
    from tokenmill.spec.draft_model import DraftModelProposer

    return DraftModelProposer(str(path), target=target, name=text)


__all__ = ["AUTO_MAX_TOKENS", "METHODS", "ProposeItem", "make_proposer", "parse_num_speculative_tokens",
           "parse_speculative"]  # fmt: skip
