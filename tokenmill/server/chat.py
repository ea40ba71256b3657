"""``POST /v1/chat/completions``: messages through the model's chat template, streamed or not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from tokenmill.server import streaming
from tokenmill.server.completions import ABORTED_MESSAGE
from tokenmill.server.errors import APIError, error_body
from tokenmill.server.logprobs import chat_logprobs
from tokenmill.server.params import reject_unsupported, resolve_max_tokens, sampling_params
from tokenmill.server.prompts import chat_prompt_ids, check_chat_size, request_template
from tokenmill.server.protocol import ChatCompletionRequest, make_id, now_s
from tokenmill.server.state import ServerState, collect
from tokenmill.server.usage import UsageCounter


async def create_chat_completion(
    state: ServerState, body: ChatCompletionRequest, request: Request
) -> Response | dict[str, Any]:
    model = state.check_model(body.model)
    reject_unsupported(body)
    template, template_param = request_template(body, state.settings.trust_request_chat_template)
    check_chat_size(body, state.limits)  # no work yet
    state.admission.check_fits(body.n, "n")
    with state.admission.reserve(body.n) as reservation:
        prompt_ids = await state.preprocessor.run(
            chat_prompt_ids, state.tokenizer, body, template, template_param, state.limits
        )
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = resolve_max_tokens(requested, len(prompt_ids), state.max_model_len, "messages")
        num_top = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling_params(body, max_tokens=max_tokens, logprobs=num_top)
        request_id = make_id("chatcmpl")
        stream, _ = await state.add_all(
            request_id,
            [prompt_ids],
            [params],
            reservation,
            arrival_time=state.async_engine.engine.clock(),
            client_id=state.client_id(request, body.user),
            priority=body.priority,
            ttft_slo=body.ttft_slo,
            tpot_slo=body.tpot_slo,
            cache_namespace=body.cache_salt or "",
        )
    usage = UsageCounter([len(prompt_ids)])
    created = now_s()

    if body.stream:
        opts = body.stream_options
        return streaming.sse_response(
            _events(body, stream, usage, request_id, created, model, num_top,
                    include_usage=bool(opts and opts.include_usage),
                    continuous_usage=bool(opts and opts.include_usage and opts.continuous_usage_stats)),
            lambda: state.abort(stream),
        )

    final = await collect(state, stream)
    out = final[request_id]
    usage.update(out)
    choices = []
    for o in out.outputs:
        if o.finish_reason == "abort":
            raise APIError(503, ABORTED_MESSAGE, code="aborted")
        logprobs = None
        if num_top is not None and o.logprobs is not None:
            logprobs = chat_logprobs(o.token_ids, o.logprobs, num_top)
        choices.append(
            {
                "index": o.index,
                "message": {"role": "assistant", "content": o.text},
                "logprobs": logprobs,
                "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason,
            }
        )
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage.body(),
        "system_fingerprint": None,
    }


async def _events(
    body: ChatCompletionRequest,
    stream: Any,
    usage: UsageCounter,
    request_id: str,
    created: int,
    model: str,
    num_top: int | None,
    *,
    include_usage: bool,
    continuous_usage: bool,
) -> AsyncIterator[bytes]:
    finished: set[int] = set()

    def chunk(choice: dict[str, Any]) -> bytes:
        body_usage = usage.body() if include_usage and continuous_usage else None
        return streaming.chunk_event("chat.completion.chunk", request_id, created, model, choice, body_usage, include_usage)

    # OpenAI opens every choice with the role and empty content.
    yield b"".join(
        chunk({"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
        for j in range(body.n)
    )
    try:
        async for out in stream:
            usage.update(out)
            # One write per engine output, not per sample: n=128 is 128 chunks a step.
            events: list[bytes] = []
            for o in out.outputs:
                if o.index in finished:
                    continue
                if o.finish_reason == "abort":
                    events.append(streaming.event(error_body(ABORTED_MESSAGE, "service_unavailable", None, "aborted")))
                    yield b"".join(events)
                    return
                has_logprobs = num_top is not None and bool(o.delta_token_ids) and o.delta_logprobs is not None
                if not (o.delta_text or o.finish_reason or has_logprobs):
                    continue
                logprobs = None
                if has_logprobs:
                    assert o.delta_logprobs is not None and num_top is not None
                    logprobs = chat_logprobs(o.delta_token_ids, o.delta_logprobs, num_top)
                delta = {"content": o.delta_text} if o.delta_text or not o.finish_reason else {}
                choice: dict[str, Any] = {
                    "index": o.index,
                    "delta": delta,
                    "logprobs": logprobs,
                    "finish_reason": o.finish_reason,
                }
                if o.finish_reason is not None:
                    finished.add(o.index)
                    choice["stop_reason"] = o.stop_reason
                events.append(chunk(choice))
            if events:
                yield b"".join(events)
    except APIError as exc:
        yield streaming.event(exc.body())
        return
    except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
        yield streaming.event(error_body(f"the engine failed: {exc}", "service_unavailable", None, "engine_unavailable"))
        return
    if include_usage:
        yield streaming.event(
            {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [], "usage": usage.body()}
        )
