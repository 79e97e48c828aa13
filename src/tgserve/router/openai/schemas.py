"""Pydantic models of the OpenAI-compatible API: chat and text completions, models, errors."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tgserve.router.native.schemas import CACHE_SALT_DOC, CacheSalt, SimpleToken, integral

_Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
_U64 = Annotated[int, Field(ge=0, le=2**64 - 1)]

# Fields of OpenAI's requests that tgserve does not implement. Each is accepted only with a value
# that asks for nothing (null, an empty list, the documented default); anything else is a 400
# naming the field, never silently ignored. Checked in openai_params.unsupported_fields.
CHAT_UNSUPPORTED = (
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "response_format",
    "audio",
    "modalities",
    "prediction",
    "store",
    "service_tier",
    "reasoning_effort",
    "web_search_options",
    "verbosity",
    "tool_prompt",
)


class _Request(BaseModel):
    """Strict JSON types; unknown keys refused (OpenAI: 400 "Unrecognized request argument")."""

    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Request):
    include_usage: bool | None = Field(
        default=None, description="Send a last chunk with `usage` and no choices."
    )
    include_obfuscation: bool | None = Field(
        default=None, description="Accepted; tgserve never pads chunks, so it has no effect."
    )


class ChatMessage(BaseModel):
    """One message; other keys are accepted only when empty (clients echo `refusal: null`)."""

    model_config = ConfigDict(strict=True, extra="allow")

    role: str = Field(examples=["user"])
    content: str | list[dict[str, Any]] | None = Field(
        default=None, description="A string, or a list of `{type: text, text}` parts."
    )
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None


class _Sampling(_Request):
    """What chat and text completions share."""

    model: str | None = Field(
        default=None, description="Accepted whatever it names; responses carry the served id."
    )
    frequency_penalty: _Penalty | None = None
    presence_penalty: _Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        default=None, description="Token id (as a string) to a bias in [-100, 100]."
    )
    max_tokens: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="null: as many as the context leaves room for."
    )
    n: Annotated[int, Field(ge=1)] | None = Field(default=None, description="Choices to return.")
    seed: _U64 | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = Field(
        default=None, description="0 is greedy; null is 1 (sampling), as OpenAI."
    )
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    user: str | None = None
    # Extensions (vLLM, llama.cpp, TGI): documented in docs/openai.md.
    ignore_eos: bool | None = Field(default=None, description="Extension: never stop at EOS.")
    top_k: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = Field(
        default=None, description="Extension."
    )
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = Field(
        default=None, description="Extension (TGI): multiplicative penalty, 1.0 is off."
    )
    cache_salt: CacheSalt | None = Field(default=None, description=CACHE_SALT_DOC)

    @field_validator("max_tokens", "n", "seed", "top_k", mode="before")
    @classmethod
    def _integral(cls, value: Any) -> Any:
        return integral(value)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(
        min_length=1, examples=[[{"role": "user", "content": "What is Deep Learning?"}]]
    )
    max_completion_tokens: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Same as `max_tokens` (OpenAI's newer name)."
    )
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    metadata: dict[str, str] | None = Field(default=None, description="Accepted, not stored.")
    safety_identifier: str | None = Field(default=None, description="Accepted, like `user`.")
    prompt_cache_key: str | None = Field(default=None, description="Accepted; no effect.")
    # Unsupported: accepted only when they ask for nothing (see CHAT_UNSUPPORTED).
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    store: Any = None
    service_tier: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    tool_prompt: Any = None

    @field_validator("max_completion_tokens", "top_logprobs", mode="before")
    @classmethod
    def _integral_chat(cls, value: Any) -> Any:
        return integral(value)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, texts, token ids, or lists of token ids.",
        examples=["The capital of France is"],
    )
    echo: bool | None = Field(default=None, description="Prepend the prompt to each choice.")
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = Field(
        default=None, description="Log-probabilities of the tokens and of this many alternatives."
    )
    best_of: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Generate this many per prompt, return the `n` most likely."
    )
    suffix: str | None = Field(
        default=None, description="Fill-in-the-middle; only for models with FIM tokens."
    )

    @field_validator("prompt", "logprobs", "best_of", mode="before")
    @classmethod
    def _integral_completion(cls, value: Any) -> Any:
        return integral(value)


# ---------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatLogprob]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A whole response, or (with finish_reason null until the end) one streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ChatTokenizeResponse(BaseModel):
    tokenize_response: list[SimpleToken]
    templated_text: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    error: ErrorDetail
