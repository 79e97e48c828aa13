"""What a step produces per request: tokens with log-probabilities and text, and the final text."""

from __future__ import annotations

from dataclasses import dataclass, field

from tgserve.shard.sampling.stopping import FinishReason


@dataclass
class Tokens:
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    is_special: list[bool] = field(default_factory=list)


@dataclass
class GeneratedText:
    text: str
    generated_tokens: int
    finish_reason: FinishReason
    seed: int | None


@dataclass
class Generation:
    request_id: int
    tokens: Tokens
    prefill_tokens: Tokens | None = None
    generated_text: GeneratedText | None = None
    top_tokens: list[Tokens] = field(default_factory=list)
    # Per prompt position, its top-n alternatives (prompt logprobs with top_n_tokens only).
    prefill_top_tokens: list[Tokens] = field(default_factory=list)


@dataclass
class StepTimings:
    forward_ns: int = 0
    decode_ns: int = 0
    total_ns: int = 0
    concat_ns: int | None = None
