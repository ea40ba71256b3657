"""From a validated OpenAI request to ``SamplingParams``; unsupported parameters refused.

Everything here that can fail raises ``APIError`` (400) naming the
parameter, so that bad input never reaches the engine thread as a surprise.
Prompts become token ids in ``prompts.py``.
"""

from __future__ import annotations

import math
from typing import Any

from tokenmill.core.kv_eviction import KVEviction
from tokenmill.core.request import SamplingParams
from tokenmill.engine import DEFAULT_EVICTION
from tokenmill.server.errors import APIError, bad_request
from tokenmill.server.protocol import (
    UNSUPPORTED_CHAT_FIELDS,
    UNSUPPORTED_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from tokenmill.structured.params import StructuredOutputsParams

# What OpenAI and vLLM send in place of -inf logprobs (JSON has no infinity).
MIN_LOGPROB = -9999.0


def clamp_logprob(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


def reject_unsupported(body: SamplingFields) -> None:
    """Refuse OpenAI and vLLM parameters whose effect tokenmill cannot give, rather than ignore them."""
    if body.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")
    unsupported = {**UNSUPPORTED_FIELDS, **(UNSUPPORTED_CHAT_FIELDS if isinstance(body, ChatCompletionRequest) else {})}
    for name, no_ops in unsupported.items():
        value = getattr(body, name, None)
        if not any(value == ok and type(value) is type(ok) for ok in no_ops):
            raise bad_request(f"{name} is not supported", name)
    if isinstance(body, CompletionRequest):
        if body.best_of is not None and body.best_of != body.n:
            raise bad_request("best_of other than n is not supported", "best_of")
        if body.suffix:
            raise bad_request("suffix is not supported", "suffix")
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        if body.continue_final_message and body.add_generation_prompt:
            raise bad_request(
                "continue_final_message and add_generation_prompt cannot both be true", "continue_final_message"
            )


def resolve_max_tokens(requested: int | None, num_prompt_tokens: int, max_model_len: int, param: str) -> int:
    """Return the max tokens to generate: ``requested``, or all the room left when None."""
    room = max_model_len - num_prompt_tokens
    if room <= 0 or (requested is not None and requested > room):
        asked = num_prompt_tokens + (requested if requested is not None else 1)
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{asked} tokens ({num_prompt_tokens} in the {param}, {asked - num_prompt_tokens} in the "
            "completion). Please reduce the length of the prompt or completion.",
            param=param,
            code="context_length_exceeded",
        )
    return room if requested is None else requested


def sampling_params(
    body: SamplingFields,
    *,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    structured_outputs: StructuredOutputsParams | None = None,
) -> SamplingParams:
    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    try:
        return SamplingParams(
            n=body.n,
            temperature=pick(body.temperature, 1.0),
            top_p=pick(body.top_p, 1.0),
            top_k=pick(body.top_k, 0),
            min_p=pick(body.min_p, 0.0),
            repetition_penalty=pick(body.repetition_penalty, 1.0),
            presence_penalty=pick(body.presence_penalty, 0.0),
            frequency_penalty=pick(body.frequency_penalty, 0.0),
            seed=body.seed,
            max_tokens=max_tokens,
            min_tokens=body.min_tokens,
            stop=body.stop,
            stop_token_ids=body.stop_token_ids,
            ignore_eos=body.ignore_eos,
            include_stop_str_in_output=body.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=body.skip_special_tokens,
            structured_outputs=structured_outputs,
        )
    except ValueError as exc:
        # SamplingParams names the parameter first ("min_tokens must be ...").
        raise bad_request(str(exc), str(exc).split(" ", 1)[0]) from None


def kv_eviction(body: SamplingFields, default: KVEviction | None) -> Any:
    """The request's KV eviction: the server's ``default`` unless it sets a ``kv_*`` field
    (``DEFAULT_EVICTION`` then), None for ``kv_eviction: "none"``; a bad combination is a 400."""
    fields = (body.kv_eviction, body.kv_budget, body.kv_sinks, body.kv_recent)
    if all(f is None for f in fields):
        return DEFAULT_EVICTION
    if body.kv_eviction == "none":
        return None
    policy = body.kv_eviction or (default.policy if default else None)
    if policy is None:
        raise bad_request("kv_budget, kv_sinks and kv_recent need kv_eviction (streaming or h2o)", "kv_eviction")
    budget = body.kv_budget if body.kv_budget is not None else (default.budget if default else None)
    if budget is None:
        raise bad_request("kv_eviction needs kv_budget (the server has no default budget)", "kv_budget")
    sinks = body.kv_sinks if body.kv_sinks is not None else (default.sinks if default else 4)
    recent = body.kv_recent if body.kv_recent is not None else (default.recent if default else None)
    try:
        return KVEviction(policy, budget, sinks=sinks, recent=recent)
    except ValueError as e:
        raise bad_request(str(e), "kv_budget") from None


def request_options(state: Any, request: Any, body: Any, model: str) -> dict[str, Any]:
    """What a completions or chat request asks of the engine besides its prompts and sampling:
    arrival, client, priority and SLOs, cache salt, KV eviction (the server's default unless the
    body sets it) and adapter."""
    default = getattr(state.async_engine.engine.config, "kv_eviction", None)
    return {
        "arrival_time": state.async_engine.clock(),
        "client_id": state.client_id(request, body.user),
        "priority": body.priority,
        "ttft_slo": body.ttft_slo,
        "tpot_slo": body.tpot_slo,
        "cache_namespace": body.cache_salt or "",
        "kv_eviction": kv_eviction(body, default),
        "lora": state.lora_for(model),
    }
