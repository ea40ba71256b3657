"""``POST /v1/chat/completions``: messages through the model's chat template, streamed or not.

With tools (``server/structured.py``), each choice's text goes through the
tool-call parser: calls become ``message.tool_calls`` (streamed as OpenAI's
``delta.tool_calls``: a call's id, type and name, then its arguments, once its
closing tag has arrived) and the choice finishes with ``tool_calls``; a
choice cut by ``max_tokens`` keeps ``length``, and a call it left open stays
in the content as text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from tokenmill.server import streaming
from tokenmill.server.completions import ABORTED_MESSAGE
from tokenmill.server.errors import APIError, error_body
from tokenmill.server.logprobs import chat_logprobs
from tokenmill.server.params import (
    reject_unsupported,
    request_options,
    resolve_max_tokens,
    sampling_params,
)
from tokenmill.server.prompts import chat_prompt_ids, check_chat_size, request_template
from tokenmill.server.protocol import ChatCompletionRequest, make_id, now_s
from tokenmill.server.state import ServerState, collect
from tokenmill.server.structured import ToolPlan, compile_spec, structured_request
from tokenmill.server.usage import UsageCounter
from tokenmill.structured.tools import ToolCall, ToolCallParser


async def create_chat_completion(
    state: ServerState, body: ChatCompletionRequest, request: Request
) -> Response | dict[str, Any]:
    model = state.check_model(body.model)
    reject_unsupported(body)
    structured = structured_request(body, state.settings.tool_call_parser)
    tools = structured.tools
    template, template_param = request_template(body, state.settings.trust_request_chat_template)
    check_chat_size(body, state.limits)  # no work yet
    state.admission.check_fits(body.n, "n")
    with state.admission.reserve(body.n) as reservation:
        prompt_ids = await state.preprocessor.run(
            chat_prompt_ids, state.tokenizer, body, template, template_param, state.limits,
            tools.template_tools if tools is not None else None,
        )  # fmt: skip
        spec = await state.preprocessor.run(compile_spec, state.async_engine.engine, structured)
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = resolve_max_tokens(requested, len(prompt_ids), state.max_model_len, "messages")
        num_top = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling_params(body, max_tokens=max_tokens, logprobs=num_top, structured_outputs=spec)
        request_id = make_id("chatcmpl")
        stream, _ = await state.add_all(
            request_id,
            [prompt_ids],
            [params],
            reservation,
            **request_options(state, request, body, model),
        )
    usage = UsageCounter([len(prompt_ids)])
    created = now_s()

    if body.stream:
        opts = body.stream_options
        return streaming.sse_response(
            _events(body, stream, usage, request_id, created, model, num_top, tools,
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
        message: dict[str, Any] = {"role": "assistant", "content": o.text}
        finish_reason = o.finish_reason
        parser = tools.parser() if tools is not None else None
        if parser is not None:
            content, calls = parser.parse(o.text)
            if calls:
                message = {"role": "assistant", "content": content or None,
                           "tool_calls": [_call_body(c) for c in calls]}  # fmt: skip
                finish_reason = _finish_with_calls(finish_reason)
        choices.append(
            {
                "index": o.index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
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
    tools: ToolPlan | None,
    *,
    include_usage: bool,
    continuous_usage: bool,
) -> AsyncIterator[bytes]:
    finished: set[int] = set()
    parsers: dict[int, ToolCallParser] = {}
    num_calls: dict[int, int] = {}

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
                finish_reason = o.finish_reason
                parser = parsers.get(o.index)
                if parser is None and tools is not None:
                    parser = parsers[o.index] = tools.parser()  # type: ignore[assignment]
                if parser is None:
                    delta: dict[str, Any] = {"content": o.delta_text} if o.delta_text or not finish_reason else {}
                    call_deltas: list[dict[str, Any]] = []
                else:
                    text, calls = parser.feed(o.delta_text)
                    if finish_reason is not None:
                        rest, _ = parser.flush()
                        text += rest
                        if parser.calls:
                            finish_reason = _finish_with_calls(finish_reason)
                    delta = {"content": text} if text else {}
                    call_deltas = []
                    for call in calls:
                        i = num_calls[o.index] = num_calls.get(o.index, -1) + 1
                        call_deltas.append({"index": i, "id": call.id, "type": "function",
                                            "function": {"name": call.name, "arguments": ""}})  # fmt: skip
                        call_deltas.append({"index": i, "function": {"arguments": call.arguments}})
                    if not (delta or call_deltas or finish_reason or logprobs):
                        continue
                # a tool call goes out as OpenAI streams one: its head, then its arguments
                choices: list[dict[str, Any]] = [
                    {"index": o.index, "delta": {**(delta if j == 0 else {}), "tool_calls": [call_delta]},
                     "logprobs": logprobs if j == 0 else None, "finish_reason": None}
                    for j, call_delta in enumerate(call_deltas)
                ]  # fmt: skip
                if not call_deltas:
                    choices.append({"index": o.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})
                elif finish_reason is not None:
                    choices.append({"index": o.index, "delta": {}, "logprobs": None, "finish_reason": finish_reason})
                if finish_reason is not None:
                    finished.add(o.index)
                    choices[-1]["stop_reason"] = o.stop_reason
                events.extend(chunk(c) for c in choices)
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


def _call_body(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _finish_with_calls(reason: str | None) -> str | None:
    """A choice whose output holds calls finishes with ``tool_calls`` unless it was cut short."""
    return "tool_calls" if reason == "stop" else reason
