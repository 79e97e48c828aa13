"""Internal request and event types, from validation through the scheduler to the stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FinishReason(str, Enum):
    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


@dataclass(frozen=True)
class SamplingParameters:
    """Mirrors NextTokenChooserParameters of the gRPC contract."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    do_sample: bool = False
    seed: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # OpenAI's frequency penalty (per occurrence in the output), beside TGI's normalised one.
    additive_frequency_penalty: float = 0.0
    watermark: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StoppingParameters:
    max_new_tokens: int
    stop_sequences: tuple[str, ...] = ()
    ignore_eos_token: bool = False


@dataclass(frozen=True)
class ValidRequest:
    """A request that passed validation: tokenized, with every limit checked."""

    inputs: str
    input_ids: tuple[int, ...]
    parameters: SamplingParameters
    stopping: StoppingParameters
    top_n_tokens: int = 0
    decoder_input_details: bool = False
    truncate: int | None = None
    add_special_tokens: bool = True
    # Prefix-cache isolation: only requests with equal salts share cached prompt blocks.
    cache_salt: bytes = b""
    # time.monotonic() by which its first token must come (None: no deadline).
    deadline: float | None = None

    @property
    def input_length(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float | None
    special: bool = False


@dataclass(frozen=True)
class GeneratedText:
    text: str
    generated_tokens: int
    finish_reason: FinishReason
    seed: int | None


@dataclass(frozen=True)
class PrefillEvent:
    """Prompt tokens with their log-probabilities (only when decoder_input_details was asked)."""

    tokens: list[Token]
    # Per prompt position, its best alternatives (when top_n_tokens was asked too).
    top_tokens: list[list[Token]] = field(default_factory=list)


@dataclass(frozen=True)
class TokenEvent:
    token: Token
    top_tokens: list[Token]


@dataclass(frozen=True)
class EndEvent:
    token: Token
    top_tokens: list[Token]
    generated_text: GeneratedText
    queued_at: float  # time.monotonic() when the request entered the queue
    started_at: float  # time.monotonic() when it joined a batch


InferEvent = PrefillEvent | TokenEvent | EndEvent


class InferError(Exception):
    """Base of the errors the inference path raises; the API maps each to a status code."""


class OverloadedError(InferError):
    pass


class DeadlineUnreachableError(OverloadedError):
    """The queue ahead would make the request's first token late: refused before queueing."""

    code = "deadline_unreachable"  # observe.failure_kind: counted apart from other overloads

    def __init__(self, eta: float, remaining: float, retry_after: float) -> None:
        super().__init__(
            f"the first token would come in about {eta:.1f}s, after the request's deadline "
            f"({max(remaining, 0.0):.1f}s from now)"
        )
        self.retry_after = retry_after


class DeadlineExceededError(InferError):
    """The request's deadline passed while it waited in the queue; the shards never saw it."""

    def __init__(self, waited: float, retry_after: float = 1.0) -> None:
        super().__init__(f"the request's deadline passed after {waited:.1f}s in the queue")
        self.retry_after = retry_after


class GenerationError(InferError):
    """A shard failed while running this request's batch."""


class IncompleteGenerationError(InferError):
    pass


@dataclass(frozen=True)
class ShardInfo:
    """What the router learns from the shards at start (Info + Warmup)."""

    model_type: str
    dtype: str
    device_type: str
    block_size: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    support_chunking: bool = False
    mixed_prefill: bool = False
    prefix_caching: bool = False
    window_size: int | None = None
    speculate: int = 0
