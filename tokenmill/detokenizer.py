"""Incremental detokenization that is right for multi-byte characters.

A byte-level BPE token may end in the middle of a UTF-8 character; decoding
it alone yields U+FFFD. We decode a short window of recent tokens and only
emit text once it no longer ends in a replacement character, and we decode
with a few tokens of left context so that tokenizers which drop a leading
space (SentencePiece) still produce the right spacing.
"""

from __future__ import annotations

from typing import Any

_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def add(self, new_token_ids: list[int]) -> str:
        """Append tokens; return the newly completed text (possibly empty)."""
        self.token_ids.extend(new_token_ids)
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # an incomplete character (or nothing visible) so far
        delta = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        # Keep the window short: only the last few tokens matter as context.
        if self.prefix_offset > 4 * _CONTEXT_TOKENS:
            drop = self.prefix_offset - _CONTEXT_TOKENS
            del self.token_ids[:drop]
            self.prefix_offset -= drop
            self.read_offset -= drop
        return delta

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
