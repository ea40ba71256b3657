"""Pydantic models of the OpenAI request and response bodies that tokenmill serves.

Requests follow OpenAI's field names and defaults; the extra fields that
OpenAI does not have (``top_k``, ``min_p``, ``repetition_penalty``,
``ignore_eos``, ``priority``, ``ttft_slo`` ...) follow vLLM's "extra body"
names, so clients that already send them to vLLM work unchanged. Types are
strict, as OpenAI checks them (``"n": "2"`` or ``"max_tokens": 16.0`` are
400s). Unknown fields are ignored, as vLLM does, so that clients sending newer OpenAI
parameters are not refused for a field that would not change the result.

Ranges are checked here (a violation is a 400 ``invalid_request_error``
naming the parameter); what needs the model (context length, vocabulary) is
checked in ``params.py``.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# 64-bit seeds: what a torch generator accepts.
_SEED_MIN, _SEED_MAX = -(2**63), 2**63 - 1
_MAX_N = 128  # samples per prompt; more is almost surely a mistake and would hold the queue
_MAX_STOP = 16  # stop strings per request
_MAX_LOGPROBS = 20
MAX_TEMPLATE_CHARS = 65536  # a request's own chat template; those on the Hub are a few KB

TokenIds = list[Annotated[int, Field(ge=0, le=2**31 - 1)]]


class _Request(BaseModel):
    # No NaN or infinity: JSON has neither, but Python's parser accepts them. Strict
    # types, as OpenAI checks them: no "5" or 5.0 for an integer, no true for a number
    # (an integer is still a number); the published schema says exactly what is taken.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class StreamOptions(_Request):
    include_usage: bool = False
    # vLLM extra: a usage object in every chunk, not only at the end.
    continuous_usage_stats: bool = False


class SamplingFields(_Request):
    """Parameters shared by completions and chat completions."""

    model: str | None = Field(None, description="defaults to the served model")
    n: int = Field(1, ge=1, le=_MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=_SEED_MIN, le=_SEED_MAX)
    stop: str | Annotated[list[str], Field(max_length=_MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="fairness identity (client id)")
    # OpenAI fields tokenmill does not implement; refused when set to a non-default value.
    logit_bias: dict[str, float] | None = None
    # vLLM-style extra sampling parameters.
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=_MAX_STOP)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Scheduling hints for fair and SLO-aware policies (vLLM-style extra body).
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1, description="lower runs first where the policy honours it")
    ttft_slo: float | None = Field(None, gt=0.0, description="time-to-first-token target, seconds")
    tpot_slo: float | None = Field(None, gt=0.0, description="time-per-output-token target, seconds")
    cache_salt: str | None = Field(None, max_length=256, description="no prefix-cache sharing across salts")

    @model_validator(mode="after")
    def _stop_strings(self) -> SamplingFields:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return self


class CompletionRequest(SamplingFields):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[TokenIds, Field(min_length=1)]
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    max_tokens: int | None = Field(16, ge=1, description="null: up to the context length")
    logprobs: int | None = Field(None, ge=0, le=_MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=_MAX_N)
    suffix: str | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str = Field(description="the arguments as a JSON string, as the model wrote them")


class ToolCall(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant message's calls, for the template")
    tool_call_id: str | None = Field(None, description="a tool message: the call it answers")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def text_length(self) -> int:
        """Characters of text this message brings to the prompt (content and tool calls)."""
        n = len(self.content) if isinstance(self.content, str) else sum(len(p.text) for p in self.content or ())
        for call in self.tool_calls or ():
            n += len(call.function.name) + len(call.function.arguments)
        return n

    def template_dict(self, content: str | None) -> dict[str, Any]:
        """The message as chat templates see it (transformers' shape); None values are dropped later."""
        return {
            "role": self.role,
            "content": content,
            "name": self.name,
            "tool_calls": [c.model_dump() for c in self.tool_calls] if self.tool_calls else None,
            "tool_call_id": self.tool_call_id,
        }


class ResponseFormat(_Request):
    type: str


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI; null: up to the context length")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=_MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    # vLLM extras for the chat template.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = Field(
        None, max_length=MAX_TEMPLATE_CHARS, description="needs --trust-request-chat-template"
    )


# ------------------------------------------------------------------ responses


def make_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tokenmill"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
