"""Pydantic models of TGI's native HTTP API (/generate, /generate_stream, /, /tokenize, /info)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tgserve.router.types import FinishReason

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1


def integral(value: Any) -> Any:
    """5.0 (or 1e3) as an int, in lists too: to JSON Schema, and so to the OpenAPI document, 5.0
    is an integer. 5.5 and "5" are left for the strict int check to refuse."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [integral(v) for v in value]
    return value


def _is_empty(value: Any) -> bool:
    return value is None or value == []


# Fields that TGI leaves out of its JSON when they are empty (serde skip_serializing_if).
_OMIT_EMPTY = Field(default=None, exclude_if=_is_empty)


class _Strict(BaseModel):
    """Request models: strict types like serde (no "5" for 5), unknown keys ignored like serde."""

    model_config = ConfigDict(strict=True, extra="ignore")

    # Keys whose value may be JSON null although the field itself is not nullable: serde would
    # refuse null, we read it as "use the default", which is what every client means by it.
    null_means_default: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict) and cls.null_means_default:
            return {
                k: v for k, v in data.items() if not (v is None and k in cls.null_means_default)
            }
        return data


class GrammarJson(_Strict):
    type: Literal["json", "json_object"]
    value: Any = Field(description="A JSON Schema, as an object or as a string.")


class GrammarRegex(_Strict):
    type: Literal["regex"]
    value: str


class JsonSchemaConfig(_Strict):
    name: str | None = Field(default=None, description="Optional name identifier for the schema")
    schema_: Any = Field(alias="schema", description="The actual JSON schema definition")


class GrammarJsonSchema(_Strict):
    type: Literal["json_schema"]
    value: JsonSchemaConfig


GrammarType = Annotated[GrammarJson | GrammarRegex | GrammarJsonSchema, Field(discriminator="type")]

_Float = Annotated[float, Field(allow_inf_nan=False)]
CacheSalt = Annotated[str, Field(min_length=1, max_length=1024)]
CACHE_SALT_DOC = (
    "Extension (vLLM's): requests share cached prompt blocks only with requests that carry the "
    "same salt; give each tenant its own."
)


class GenerateParameters(_Strict):
    null_means_default = (
        "do_sample",
        "stop",
        "watermark",
        "details",
        "decoder_input_details",
        "ignore_eos",
    )

    best_of: Annotated[int, Field(ge=0)] | None = Field(
        default=None,
        description="Generate best_of sequences and return the one if the highest token logprobs.",
        examples=[1],
    )
    temperature: _Float | None = Field(
        default=None,
        description="The value used to module the logits distribution.",
        examples=[0.5],
    )
    repetition_penalty: _Float | None = Field(
        default=None,
        description="The parameter for repetition penalty. 1.0 means no penalty.",
        examples=[1.03],
    )
    frequency_penalty: _Float | None = Field(
        default=None,
        description="Penalize new tokens based on their existing frequency in the text so far.",
        examples=[0.1],
    )
    # The shards take a u32 (any k past the vocabulary keeps it all); TGI's own bound is i32.
    top_k: Annotated[int, Field(le=_U32_MAX)] | None = Field(
        default=None,
        description="The number of highest probability vocabulary tokens to keep for "
        "top-k-filtering.",
        examples=[10],
    )
    top_p: _Float | None = Field(
        default=None, description="Top-p value for nucleus sampling.", examples=[0.95]
    )
    typical_p: _Float | None = Field(
        default=None, description="Typical Decoding mass.", examples=[0.95]
    )
    do_sample: bool = Field(default=False, description="Activate logits sampling.")
    max_new_tokens: Annotated[int, Field(ge=0, le=_U32_MAX)] | None = Field(
        default=None, description="Maximum number of tokens to generate.", examples=[20]
    )
    return_full_text: bool | None = Field(
        default=None, description="Whether to prepend the prompt to the generated text"
    )
    stop: list[str] = Field(
        default_factory=list,
        description="Stop generating tokens if a member of `stop` is generated.",
        examples=[["photographer"]],
    )
    truncate: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Truncate inputs tokens to the given size."
    )
    watermark: bool = Field(
        default=False,
        description="Watermarking with [A Watermark for Large Language Models]"
        "(https://arxiv.org/abs/2301.10226).",
    )
    details: bool = Field(default=False, description="Whether to return generation details.")
    decoder_input_details: bool = Field(
        default=False, description="Whether to return decoder input token logprobs and ids."
    )
    seed: Annotated[int, Field(ge=0, le=_U64_MAX)] | None = Field(
        default=None, description="Random sampling seed."
    )
    top_n_tokens: Annotated[int, Field(ge=0, le=_U32_MAX)] | None = Field(
        default=None,
        description="The number of highest probability vocabulary tokens to keep for "
        "top-n-filtering.",
        examples=[5],
    )
    grammar: GrammarType | None = None
    adapter_id: str | None = Field(default=None, description="Lora adapter id")
    # Extension (vLLM, llama.cpp): keep generating past the end-of-sequence token.
    ignore_eos: bool = Field(
        default=False, description="Do not stop at the end-of-sequence token (extension)."
    )
    cache_salt: CacheSalt | None = Field(
        default=None, description=CACHE_SALT_DOC
    )

    @field_validator(
        "best_of", "top_k", "max_new_tokens", "truncate", "seed", "top_n_tokens", mode="before"
    )
    @classmethod
    def _integral(cls, value: Any) -> Any:
        return integral(value)


def _default_parameters() -> GenerateParameters:
    # TGI quirk kept for drop-in behaviour: a request without "parameters" samples.
    return GenerateParameters(do_sample=True)


class GenerateRequest(_Strict):
    inputs: str = Field(examples=["My name is Olivier and I"])
    parameters: GenerateParameters = Field(default_factory=_default_parameters)


class CompatGenerateRequest(GenerateRequest):
    null_means_default = ("stream",)

    stream: bool = False


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = _OMIT_EMPTY


class Details(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = _OMIT_EMPTY
    best_of_sequences: list[BestOfSequence] | None = _OMIT_EMPTY


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = _OMIT_EMPTY


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    input_length: int


class StreamResponse(BaseModel):
    index: int
    token: Token
    top_tokens: list[Token] | None = _OMIT_EMPTY
    generated_text: str | None = None
    details: StreamDetails | None = None


class SimpleToken(BaseModel):
    id: int
    text: str
    start: int
    stop: int


class Readiness(BaseModel):
    ready: bool = Field(examples=[True])
    reason: str | None = None


class NotReady(BaseModel):
    ready: bool = Field(examples=[False])
    reason: str = Field(examples=["warming_up"])
    error: str
    error_type: str = Field(examples=["unavailable"])


class ErrorResponse(BaseModel):
    error: str
    error_type: str


class Info(BaseModel):
    # Extra keys are allowed so that the launcher can expose more than TGI without a schema edit.
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model_id: str
    model_sha: str | None = None
    model_pipeline_tag: str | None = None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None = None
    docker_label: str | None = None
