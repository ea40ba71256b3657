"""Token accounting for the ``usage`` object, fed with cumulative outputs as they arrive."""

from __future__ import annotations

from typing import Any

from tokenmill.outputs import RequestOutput


class UsageCounter:
    """``prompt_tokens`` counts each prompt once (not once per sample), as OpenAI does."""

    def __init__(self, prompt_lens: list[int]) -> None:
        self.prompt_tokens = sum(prompt_lens)
        self._completion: dict[str, int] = {}
        self._cached: dict[str, int] = {}

    def update(self, out: RequestOutput) -> None:
        self._completion[out.request_id] = sum(len(o.token_ids) for o in out.outputs)
        self._cached[out.request_id] = out.num_cached_tokens

    def body(self) -> dict[str, Any]:
        completion = sum(self._completion.values())
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": sum(self._cached.values())},
        }
