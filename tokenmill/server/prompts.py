"""Prompts to token ids: bounds checked on the event loop, the work done on a bounded thread pool.

On the event loop only what costs nothing: how many prompts, how many
characters or token ids each has. A prompt over the character limit
(``--max-prompt-chars``, by default the context length times a generous
characters-per-token factor) cannot fit the context and is refused before
anything reads it. The work (chat template rendering in the sandbox of
``chat_template.py``, tokenization, the vocabulary check, decoding token ids
for ``echo``) runs on ``Preprocessor``'s threads, so that a long prompt never
stalls other streams or ``/health``: fast tokenizers release the GIL while
they encode, and a template render holds it only between bytecodes. A
handler whose client has gone cancels its job; a job over several prompts
stops at the next prompt.

Every refusal is an ``APIError`` (400) naming the parameter.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from tokenmill.server.chat_template import (
    TemplateError,
    TemplateLimitError,
    TemplateLimits,
    TemplateRefusal,
    render_chat_template,
)
from tokenmill.server.errors import APIError, bad_request
from tokenmill.server.protocol import MAX_TEMPLATE_CHARS, ChatCompletionRequest

T = TypeVar("T")


@dataclass(frozen=True)
class PromptLimits:
    max_model_len: int  # tokens
    max_chars: int  # characters of one prompt (of all messages, for chat)
    max_prompts: int  # prompts in one completions request
    vocab_size: int
    template_timeout_s: float

    def template_limits(self) -> TemplateLimits:
        # Values may briefly be larger than the prompt (tojson of the messages ...). The
        # prompt itself is held to max_chars after rendering, as context_length_exceeded.
        size = 2 * self.max_chars
        return TemplateLimits(max_chars=size, max_output_chars=size, timeout_s=self.template_timeout_s)


def context_exceeded(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="context_length_exceeded")


def _too_many_chars(num_chars: int, limits: PromptLimits, param: str) -> APIError:
    return context_exceeded(
        f"The {param} is {num_chars} characters long; this server takes at most {limits.max_chars} characters "
        f"per prompt (the model's maximum context length is {limits.max_model_len} tokens). "
        "Please reduce the length of the prompt.",
        param,
    )


def _too_many_tokens(num_tokens: int, limits: PromptLimits, param: str) -> APIError:
    return context_exceeded(
        f"This model's maximum context length is {limits.max_model_len} tokens. However, the {param} has "
        f"{num_tokens} tokens, which leaves no room for the completion. Please reduce the length of the prompt.",
        param,
    )


# ------------------------------------------------------------ event loop


def split_completion_prompt(prompt: Any, limits: PromptLimits) -> list[str | list[int]]:
    """The prompts of a completions request (text or token ids), with count and sizes checked."""
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        prompts: list[Any] = [prompt]
    else:
        prompts = list(prompt)
        if len(prompts) > limits.max_prompts:
            raise APIError(
                400,
                f"prompt has {len(prompts)} prompts; this server takes at most {limits.max_prompts} per request "
                "(--max-prompts-per-request)",
                param="prompt",
                code="too_many_prompts",
            )
    for i, p in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if not p:
            raise bad_request(f"{param} is empty", "prompt")
        if isinstance(p, str):
            if len(p) > limits.max_chars:
                raise _too_many_chars(len(p), limits, "prompt")
        elif len(p) >= limits.max_model_len:
            raise _too_many_tokens(len(p), limits, "prompt")
    return prompts


def check_chat_size(body: ChatCompletionRequest, limits: PromptLimits) -> None:
    """Refuse messages whose text alone is over the character limit."""
    total = 0
    for m in body.messages:
        total += m.text_length()
        if total > limits.max_chars:
            raise _too_many_chars(total, limits, "messages")


# ------------------------------------------------------------- thread pool


class Cancelled(Exception):
    """The job's client has gone; the job stops at the next prompt."""


class Preprocessor:
    """A bounded thread pool for prompt work; ``run`` awaits a job and cancels it with its caller."""

    def __init__(self, num_threads: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(1, num_threads), thread_name_prefix="tokenmill-prompts")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args, cancel=event)`` on the pool; the event is set if the awaiting task is cancelled."""
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, functools.partial(fn, *args, cancel=cancel))
        try:
            return await future
        except asyncio.CancelledError:
            cancel.set()  # a job that has started stops at its next check; a queued one never starts
            raise

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _check_text(value: str, param: str) -> None:
    """Refuse strings that are not valid Unicode (lone surrogates): they cannot be tokenized or echoed."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{param} is not valid Unicode (it contains a lone surrogate)", param) from None


def _encode(tokenizer: Any, text: str, param: str, *, add_special_tokens: bool) -> list[int]:
    _check_text(text, param)
    try:
        return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    except Exception as exc:  # noqa: BLE001 - a tokenizer failure is the input's fault here
        raise bad_request(f"could not tokenize {param}: {exc}", param) from None


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"{param}: token id {bad} is outside the vocabulary [0, {vocab_size})", param)


def tokenize_prompts(
    tokenizer: Any, prompts: list[str | list[int]], limits: PromptLimits, decode: bool, *, cancel: threading.Event
) -> list[tuple[str | None, list[int]]]:
    """(text or None, token ids) per prompt; with ``decode``, token-id prompts get their text (for echo)."""
    out: list[tuple[str | None, list[int]]] = []
    for i, p in enumerate(prompts):
        if cancel.is_set():
            raise Cancelled
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            ids = _encode(tokenizer, p, param, add_special_tokens=True)
            text: str | None = p
        else:
            ids = list(p)
            check_token_ids(ids, limits.vocab_size, param)
            text = tokenizer.decode(ids) if decode else None
        if len(ids) >= limits.max_model_len:
            raise _too_many_tokens(len(ids), limits, param)
        out.append((text, ids))
    return out


_REQUEST_TEMPLATE_HINT = "start the server with --trust-request-chat-template to allow it"


def request_template(body: ChatCompletionRequest, trusted: bool) -> tuple[str | None, str]:
    """The template sent with the request, if any, and the parameter that carried it; refused unless trusted."""
    kw_template = (body.chat_template_kwargs or {}).get("chat_template")
    source, param = (body.chat_template, "chat_template") if body.chat_template is not None else (
        kw_template, "chat_template_kwargs.chat_template"
    )
    if source is None:
        return None, "messages"
    if not trusted:
        raise APIError(
            400,
            f"{param}: this server does not run chat templates sent with requests; {_REQUEST_TEMPLATE_HINT}",
            param=param,
            code="untrusted_chat_template",
        )
    if not isinstance(source, str):
        raise bad_request(f"{param} must be a string", param)
    if len(source) > MAX_TEMPLATE_CHARS:
        raise bad_request(f"{param} is longer than {MAX_TEMPLATE_CHARS} characters", param)
    return source, param


def _model_template(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates (transformers): the default one
        template = template.get("default")
    if not isinstance(template, str) or not template:
        raise bad_request("the model has no chat template; use /v1/completions", "messages")
    return template


def chat_prompt_ids(
    tokenizer: Any,
    body: ChatCompletionRequest,
    source: str | None,
    param: str,
    limits: PromptLimits,
    tools: list[dict[str, Any]] | None = None,
    *,
    cancel: threading.Event,
) -> list[int]:
    """Render the messages (and ``tools``, the tools the template is to show) with the
    request's template (``source``) or the model's, and tokenize them."""
    messages = []
    for i, m in enumerate(body.messages):
        content = None if m.content is None else m.text()
        if content is not None:
            _check_text(content, f"messages[{i}].content")
        messages.append(m.template_dict(content))
    variables = {**(getattr(tokenizer, "special_tokens_map", None) or {}), **(body.chat_template_kwargs or {})}
    try:
        text = render_chat_template(
            source if source is not None else _model_template(tokenizer),
            messages,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            variables=variables,
            limits=limits.template_limits(),
            tools=tools,
        )
    except TemplateLimitError as exc:
        raise APIError(400, f"the chat template went past the server's limits: {exc}", param=param,
                       code="chat_template_limit") from None  # fmt: skip
    except TemplateRefusal as exc:
        raise APIError(400, f"the chat template refused these messages: {exc}", param="messages",
                       code="chat_template_error") from None  # fmt: skip
    except (TemplateError, ValueError, TypeError, LookupError, ArithmeticError, AttributeError) as exc:
        # template bugs and messages a template cannot handle are both the request's to fix
        raise APIError(400, f"the chat template failed on these messages: {type(exc).__name__}: {exc}",
                       param=param, code="chat_template_error") from None  # fmt: skip
    if cancel.is_set():
        raise Cancelled
    if len(text) > limits.max_chars:
        raise _too_many_chars(len(text), limits, "messages")
    # The template already holds the special tokens it wants (BOS included).
    ids = _encode(tokenizer, text, "messages", add_special_tokens=False)
    if not ids:
        raise bad_request("the messages render to an empty prompt", "messages")
    return ids
