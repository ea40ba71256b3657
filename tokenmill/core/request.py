"""Requests as the core sees them: one sequence, its sampling parameters and its state.

A user request with ``n > 1`` samples becomes ``n`` core requests (the engine
fans it out), so the scheduler and the KV manager only ever deal with single
sequences.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenmill.core.kv_eviction import KVEviction
from tokenmill.core.lora import LoRARequest
from tokenmill.structured.params import StructuredOutputsParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"  # the client went away or the engine aborted it

    def __str__(self) -> str:
        return self.value


@dataclass
class SamplingParams:
    """How to sample one completion; names and defaults follow vLLM's offline API."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # in [-2**63, 2**64); each distinct seed draws its own stream
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token (0: the sampled one only)
    # top-N logprobs per prompt token (the first has none); such a request recomputes
    # the prompt positions the prefix cache holds rather than skipping them
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # The output's form (JSON schema, regex, choice, grammar); tokenmill/structured.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**_known(self.structured_outputs))
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first parameter that is out of range."""
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 or -1 (off) or a positive integer, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise ValueError(f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}")
        if any(not s for s in self.stop):  # type: ignore[union-attr]
            raise ValueError("stop strings must be non-empty")
        so = self.structured_outputs
        if so is not None:
            if not isinstance(so, StructuredOutputsParams):
                raise ValueError("structured_outputs must be a StructuredOutputsParams")
            so.validate()
            if self.ignore_eos:
                # the grammar ends with EOS: ignoring it would leave nothing to generate
                raise ValueError("structured_outputs cannot be combined with ignore_eos")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def _known(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` if they are all ``StructuredOutputsParams``'s, else a ValueError naming one."""
    from dataclasses import fields as dc_fields

    names = {f.name for f in dc_fields(StructuredOutputsParams)}
    unknown = [k for k in fields if k not in names]
    if unknown:
        raise ValueError(f"structured_outputs: unknown field {unknown[0]!r} (known: {', '.join(sorted(names))})")
    return fields


@dataclass(eq=False)
class Request:
    """One sequence in the core. Identity is the object; ``request_id`` names it.

    ``num_computed_tokens`` counts the tokens whose KV is in the cache; the
    scheduler tops it up towards ``num_tokens`` each step (vLLM v1 style), so
    there is no separate prefill or decode phase.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = 0.0
    eos_token_ids: tuple[int, ...] = ()
    client_id: str = ""  # fairness identity (OpenAI ``user``)
    cache_namespace: str = ""  # prefix-cache salt / adapter: no sharing across namespaces
    priority: int = 0  # lower runs first where the policy honours it
    ttft_slo: float | None = None  # seconds, for SLO-aware policies
    tpot_slo: float | None = None
    predicted_output_len: int | None = None  # hint for length-aware policies
    parent_id: str | None = None  # the user request this sample belongs to
    hold_kv: bool = False  # keep its KV blocks after it finishes, for export (prefill of P/D)
    sample_index: int = 0
    kv_eviction: KVEviction | None = None  # keep at most a budget of KV entries (kv_eviction.py)
    lora: LoRARequest | None = None  # the adapter it runs with (None: the base model)

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens served from the prefix cache at first admission
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    seq_no: int = 0  # arrival order; the scheduler sets it, ties break on it
    # Speculative decoding: tokens a proposer guessed after the last one, for the next
    # step to verify (set and cleared by ``Scheduler.update``; core/spec.py).
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def lora_id(self) -> int:
        """Its adapter's ``lora_int_id``; 0 for the base model."""
        return 0 if self.lora is None else self.lora.lora_int_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, stop: int) -> list[int]:
        """Tokens ``[start, stop)`` of prompt + output without building the whole list."""
        p = len(self.prompt_token_ids)
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        if start >= p:
            return self.output_token_ids[start - p : stop - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - p]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def max_output_tokens(self) -> int | None:
        return self.sampling_params.max_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        """True until the prompt has been computed once for a request that asked for its logprobs
        (they are all handed out by the time the first token is sampled)."""
        return self.sampling_params.prompt_logprobs is not None and not self.output_token_ids

    def check_output(
        self, tokens: Sequence[int], max_model_len: int
    ) -> tuple[int, FinishReason | None, int | str | None]:
        """How many of ``tokens`` (sampled after the current output) the request takes:
        all of them, or those up to the first stop condition (EOS, a stop token after
        ``min_tokens``, ``max_tokens``, or ``max_model_len`` in all).

        Returns that count, the finish reason (None while it runs on) and the stop
        token that ended it, if any. Pure: the engine uses it to stream the tokens of a
        multi-step plan before ``update`` appends them with ``append_output``.
        """
        sp = self.sampling_params
        eos = () if sp.ignore_eos else self.eos_token_ids
        stop_ids = sp.stop_token_ids
        max_tokens = sp.max_tokens
        n0 = len(self.output_token_ids)
        total0 = len(self.prompt_token_ids) + n0
        if not (eos or stop_ids) or not any(t in eos or t in stop_ids for t in tokens):  # type: ignore[operator]
            # No token can stop the request, so only the length limits apply: the
            # loop below would stop right after the token that reaches the first one.
            room = max_model_len - total0
            if max_tokens is not None and max_tokens - n0 < room:
                room = max_tokens - n0
            if room < 1:
                room = 1
            if room <= len(tokens):
                return room, FinishReason.LENGTH, None
            return len(tokens), None, None
        for i, t in enumerate(tokens):
            n_out = n0 + i + 1
            if n_out >= sp.min_tokens:
                if t in eos:
                    return i + 1, FinishReason.STOP, None
                if stop_ids and t in stop_ids:  # type: ignore[operator]
                    return i + 1, FinishReason.STOP, t
            if (max_tokens is not None and n_out >= max_tokens) or total0 + i + 1 >= max_model_len:
                return i + 1, FinishReason.LENGTH, None
        return len(tokens), None, None

    def append_output(
        self, tokens: Sequence[int], max_model_len: int
    ) -> tuple[list[int], FinishReason | None, int | str | None]:
        """Append sampled tokens up to the first stop condition (see ``check_output``).

        Returns the tokens appended, the finish reason (None while it runs on) and the
        stop token that ended it, if any.
        """
        n, reason, stop_reason = self.check_output(tokens, max_model_len)
        new = list(tokens) if n == len(tokens) else list(tokens[:n])
        self.output_token_ids.extend(new)
        return new, reason, stop_reason
