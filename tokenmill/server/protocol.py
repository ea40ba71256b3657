"""Pydantic models of the OpenAI request and response bodies that tokenmill serves.

Requests follow OpenAI's field names and defaults; the extra fields that
OpenAI does not have (``top_k``, ``min_p``, ``repetition_penalty``,
``ignore_eos``, ``priority``, ``ttft_slo`` ...) follow vLLM's "extra body"
names, so clients that already send them to vLLM work unchanged. Types are
strict, as OpenAI checks them (``"n": "2"`` or ``"max_tokens": 16.0`` are
400s). Unknown fields are ignored, as vLLM does, so that clients sending newer OpenAI
parameters are not refused for a field that would not change the result; the
fields of OpenAI's and vLLM's APIs that would change it and that tokenmill does
not implement are declared (``UNSUPPORTED_FIELDS``) and refused when set.

Structured output comes as OpenAI's ``response_format`` (``json_object``,
``json_schema``), vLLM's ``structured_outputs`` body field or its older
``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``;
tools as OpenAI's ``tools`` / ``tool_choice`` (``server/structured.py``).

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


class JSONSchemaFormat(_Request):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True, populate_by_name=True)

    name: str = Field(max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="a JSON schema; none: any JSON object")
    strict: bool | None = Field(None, description="always enforced: the output follows the schema")


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(_Request):
    """vLLM's ``structured_outputs`` body field: exactly one of the spec fields."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True, populate_by_name=True)

    json_: dict[str, Any] | bool | str | None = Field(None, alias="json", description="a JSON schema")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="xgrammar EBNF (root ::= ...) or Lark")
    json_object: bool | None = None
    structural_tag: dict[str, Any] | str | None = None
    disable_any_whitespace: bool | None = None
    # taken: the grammar never adds properties a schema does not list, and never falls back
    disable_additional_properties: bool | None = None
    disable_fallback: bool | None = None
    whitespace_pattern: str | None = Field(None, description="not supported: refused when set")


# Fields of OpenAI's or vLLM's APIs that change the output and that tokenmill does not
# implement, with the values that change nothing: a request setting any other value gets
# a 400 naming the field, never an answer that silently ignores it.
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0),
    "bad_words": (None, []),
    "allowed_token_ids": (None,),
    "logits_processors": (None, []),
    "truncate_prompt_tokens": (None,),
    "prompt_logprobs": (None,),
    "guided_whitespace_pattern": (None,),
    "spaces_between_special_tokens": (None, True),
    "return_tokens_as_token_ids": (None, False),
    "structural_tag": (None,),
}
UNSUPPORTED_CHAT_FIELDS: dict[str, tuple[Any, ...]] = {
    "functions": (None,),
    "function_call": (None,),
    "prediction": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "documents": (None,),
    "echo": (None, False),
}
_UNSUPPORTED = Field(None, description="not supported: a request that sets it is refused")


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
    # KV eviction for long contexts (core/kv_eviction.py); unset: the server's --kv-eviction.
    kv_eviction: Literal["none", "streaming", "h2o"] | None = Field(
        None, description="evict KV past kv_budget: streaming (sinks + recent) or h2o (heavy hitters); none: keep all"
    )
    kv_budget: int | None = Field(None, ge=1, le=2**31 - 1, description="KV tokens the request keeps at most")
    kv_sinks: int | None = Field(None, ge=0, le=2**31 - 1, description="first tokens always kept (attention sinks)")
    kv_recent: int | None = Field(None, ge=1, le=2**31 - 1, description="newest tokens always kept")
    # Structured output (see the module docstring); at most one of these per request.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = Field(None, description="xgrammar (or auto) only")
    # Declared so that setting them is refused (UNSUPPORTED_FIELDS), not ignored.
    use_beam_search: Any = _UNSUPPORTED
    length_penalty: Any = _UNSUPPORTED
    bad_words: Any = _UNSUPPORTED
    allowed_token_ids: Any = _UNSUPPORTED
    logits_processors: Any = _UNSUPPORTED
    truncate_prompt_tokens: Any = _UNSUPPORTED
    prompt_logprobs: Any = _UNSUPPORTED
    guided_whitespace_pattern: Any = _UNSUPPORTED
    spaces_between_special_tokens: Any = _UNSUPPORTED
    return_tokens_as_token_ids: Any = _UNSUPPORTED
    structural_tag: Any = _UNSUPPORTED

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


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments")
    strict: bool | None = Field(None, description="arguments always follow the schema when the output is constrained")


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI; null: up to the context length")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=_MAX_LOGPROBS)
    tools: Annotated[list[ChatTool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: auto with tools, none without"
    )
    parallel_tool_calls: bool | None = Field(None, description="false: at most one tool call")
    # vLLM extras for the chat template.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = Field(
        None, max_length=MAX_TEMPLATE_CHARS, description="needs --trust-request-chat-template"
    )
    functions: Any = _UNSUPPORTED
    function_call: Any = _UNSUPPORTED
    prediction: Any = _UNSUPPORTED
    audio: Any = _UNSUPPORTED
    modalities: Any = _UNSUPPORTED
    reasoning_effort: Any = _UNSUPPORTED
    web_search_options: Any = _UNSUPPORTED
    documents: Any = _UNSUPPORTED
    echo: Any = _UNSUPPORTED


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


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


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
    tool_calls: list[DeltaToolCall] | None = None


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
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int | None = None


class LoadLoraAdapterRequest(BaseModel):
    """``POST /v1/load_lora_adapter`` (vLLM's body)."""

    lora_name: str = Field(..., min_length=1, max_length=256)
    lora_path: str = Field(..., min_length=1, max_length=4096)


class UnloadLoraAdapterRequest(BaseModel):
    """``POST /v1/unload_lora_adapter`` (vLLM's body; ``lora_int_id`` is accepted and ignored)."""

    lora_name: str = Field(..., min_length=1, max_length=256)
    lora_int_id: int | None = None


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
