"""``POST /v1/completions``: one or many prompts, streamed or not.

A batched prompt (a list of strings or of token-id lists) becomes one engine
request per prompt; choice ``i * n + j`` is sample ``j`` of prompt ``i``, as
OpenAI numbers them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from tokenmill.outputs import RequestOutput
from tokenmill.server import streaming
from tokenmill.server.errors import APIError, error_body
from tokenmill.server.logprobs import completion_logprobs
from tokenmill.server.params import (
    reject_unsupported,
    request_options,
    resolve_max_tokens,
    sampling_params,
)
from tokenmill.server.prompts import split_completion_prompt, tokenize_prompts
from tokenmill.server.protocol import CompletionRequest, make_id, now_s
from tokenmill.server.state import ServerState, collect
from tokenmill.server.structured import compile_spec, structured_request
from tokenmill.server.usage import UsageCounter

ABORTED_MESSAGE = "the request was aborted: the server is shutting down"


async def create_completion(state: ServerState, body: CompletionRequest, request: Request) -> Response | dict[str, Any]:
    model = state.check_model(body.model)
    reject_unsupported(body)
    structured = structured_request(body)
    texts = split_completion_prompt(body.prompt, state.limits)  # count and sizes: no work yet
    state.admission.check_fits(len(texts) * body.n, "n")
    with state.admission.reserve(len(texts) * body.n) as reservation:
        prompts = await state.preprocessor.run(tokenize_prompts, state.tokenizer, texts, state.limits, body.echo)
        spec = await state.preprocessor.run(compile_spec, state.async_engine.engine, structured)
        params = [
            sampling_params(
                body,
                max_tokens=resolve_max_tokens(body.max_tokens, len(ids), state.max_model_len, "prompt"),
                logprobs=body.logprobs,
                # echo with logprobs: the prompt's logprobs too, as vLLM and OpenAI give them
                prompt_logprobs=body.logprobs if body.echo else None,
                structured_outputs=spec,
            )
            for _, ids in prompts
        ]
        request_id = make_id("cmpl")
        stream, engine_ids = await state.add_all(
            request_id,
            [ids for _, ids in prompts],
            params,
            reservation,
            **request_options(state, request, body, model),
        )
    index_of = {rid: i for i, rid in enumerate(engine_ids)}
    echo = [(text or "") if body.echo else "" for text, _ in prompts]
    usage = UsageCounter([len(ids) for _, ids in prompts])
    created = now_s()

    if body.stream:
        opts = body.stream_options
        return streaming.sse_response(
            _events(body, stream, index_of, echo, usage, request_id, created, model, _decoder(state),
                    include_usage=bool(opts and opts.include_usage),
                    continuous_usage=bool(opts and opts.include_usage and opts.continuous_usage_stats)),
            lambda: state.abort(stream),
        )

    final = await collect(state, stream)
    choices = []
    for rid, out in final.items():
        usage.update(out)
        i = index_of[rid]
        for o in out.outputs:
            if o.finish_reason == "abort":
                raise APIError(503, ABORTED_MESSAGE, code="aborted")
            logprobs = None
            if body.logprobs is not None and o.logprobs is not None:
                if body.echo:
                    logprobs, _ = completion_logprobs(
                        out.prompt_token_ids + o.token_ids, [*(out.prompt_logprobs or []), *o.logprobs],
                        body.logprobs, 0, _decoder(state),
                    )  # fmt: skip
                else:
                    logprobs, _ = completion_logprobs(o.token_ids, o.logprobs, body.logprobs, 0)
            choices.append(
                {
                    "index": i * body.n + o.index,
                    "text": echo[i] + o.text,
                    "logprobs": logprobs,
                    "finish_reason": o.finish_reason,
                    "stop_reason": o.stop_reason,
                }
            )
    choices.sort(key=lambda c: c["index"])
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage.body(),
        "system_fingerprint": None,
    }


def _decoder(state: ServerState) -> Callable[[int], str]:
    """Text of one token (for the first prompt token under echo, which has no logprob entry)."""
    return lambda token_id: state.tokenizer.decode([token_id])


async def _events(
    body: CompletionRequest,
    stream: Any,
    index_of: dict[str, int],
    echo: list[str],
    usage: UsageCounter,
    request_id: str,
    created: int,
    model: str,
    decode: Callable[[int], str],
    *,
    include_usage: bool,
    continuous_usage: bool,
) -> AsyncIterator[bytes]:
    n = body.n
    want_logprobs = body.logprobs is not None
    finished: set[int] = set()
    offsets: dict[int, int] = {}
    # echo with logprobs: a prompt's echo waits for its logprobs (they come with its first token)
    echo_later = body.echo and want_logprobs
    echoed: set[int] = set()

    def chunk(choice: dict[str, Any]) -> bytes:
        body_usage = usage.body() if include_usage and continuous_usage else None
        return streaming.chunk_event("text_completion", request_id, created, model, choice, body_usage, include_usage)

    if body.echo and not echo_later:
        yield b"".join(
            chunk({"index": i * n + j, "text": text, "logprobs": None, "finish_reason": None})
            for i, text in enumerate(echo)
            for j in range(n)
        )
    try:
        async for out in stream:
            usage.update(out)
            # One write per engine output, not per sample: n=128 is 128 chunks a step.
            events: list[bytes] = []
            i = index_of[out.request_id]
            if echo_later and i not in echoed and out.prompt_logprobs is not None:
                echoed.add(i)
                for j in range(n):
                    logprobs, offsets[i * n + j] = completion_logprobs(
                        out.prompt_token_ids, out.prompt_logprobs, body.logprobs or 0, 0, decode
                    )
                    events.append(chunk({"index": i * n + j, "text": echo[i], "logprobs": logprobs,
                                         "finish_reason": None}))  # fmt: skip
            for choice in _chunks_for(out, index_of[out.request_id], n, want_logprobs, body.logprobs or 0, finished, offsets):
                if choice.get("finish_reason") == "abort":
                    events.append(streaming.event(error_body(ABORTED_MESSAGE, "service_unavailable", None, "aborted")))
                    yield b"".join(events)
                    return
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
            {"id": request_id, "object": "text_completion", "created": created, "model": model,
             "choices": [], "usage": usage.body()}
        )


def _chunks_for(
    out: RequestOutput,
    prompt_index: int,
    n: int,
    want_logprobs: bool,
    num_top: int,
    finished: set[int],
    offsets: dict[int, int],
) -> list[dict[str, Any]]:
    choices = []
    for o in out.outputs:
        index = prompt_index * n + o.index
        if index in finished:
            continue  # a finished sample stays in later snapshots of its request
        has_logprobs = want_logprobs and bool(o.delta_token_ids) and o.delta_logprobs is not None
        if not (o.delta_text or o.finish_reason or has_logprobs):
            continue
        logprobs = None
        if has_logprobs:
            assert o.delta_logprobs is not None
            logprobs, offsets[index] = completion_logprobs(
                o.delta_token_ids, o.delta_logprobs, num_top, offsets.get(index, 0)
            )
        choice: dict[str, Any] = {
            "index": index,
            "text": o.delta_text,
            "logprobs": logprobs,
            "finish_reason": o.finish_reason,
        }
        if o.finish_reason is not None:
            finished.add(index)
            choice["stop_reason"] = o.stop_reason
        choices.append(choice)
    return choices
