"""The core's batch types: what a step asks of the shards and gets back, without protobuf."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tgserve.router.core.blocks import BlockAllocation
from tgserve.router.types import (
    EndEvent,
    GeneratedText,
    InferEvent,
    PrefillEvent,
    Token,
    TokenEvent,
    ValidRequest,
)


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """One request of a new batch: its id in the router, what it asks, and its KV blocks."""

    id: int
    request: ValidRequest
    allocation: BlockAllocation


@dataclass(frozen=True, slots=True)
class Batch:
    """New requests to prefill together."""

    id: int
    requests: Sequence[BatchRequest]
    size: int
    max_tokens: int
    max_blocks: int


# Not frozen: a frozen dataclass's __init__ goes through object.__setattr__ per field, and the
# types below are built for every step (a Generation for every request of it).


@dataclass(slots=True)
class CachedBatch:
    """A batch the shards hold between steps, as they last reported it."""

    id: int
    request_ids: Sequence[int]
    size: int
    max_tokens: int
    current_tokens: int = 0


@dataclass(slots=True)
class Generation:
    """What one step produced for one request."""

    request_id: int
    tokens: list[Token]
    top_tokens: list[list[Token]]  # per token, its best alternatives (when asked)
    generated_text: GeneratedText | None  # set when the request ended with this step
    # The prompt's tokens with their log-probabilities, only when the request asked for them;
    # () otherwise: an empty tuple is one shared object, an empty list one more for the GC to track.
    prefill_tokens: Sequence[Token]
    prefill_top_tokens: Sequence[list[Token]]


@dataclass(frozen=True)
class ShardTimings:
    """Durations the shards report for one step; the slowest shard's value for each."""

    forward_ns: int
    decode_ns: int
    total_ns: int
    concat_ns: int | None = None
    forward_ns_per_shard: tuple[int, ...] = ()  # by rank


@dataclass(frozen=True)
class StepResult:
    """What a Prefill or Decode returns: every rank's generations and the batch left cached."""

    generations: list[Generation]
    batch: CachedBatch | None
    timings: ShardTimings


@dataclass(frozen=True)
class WarmupResult:
    """What the smallest rank can hold after warmup; 0 or None where the shards did not say."""

    max_supported_total_tokens: int | None
    max_input_tokens: int
    max_total_tokens: int


def generation_events(
    generation: Generation, with_prefill: bool, queued_at: float, started_at: float
) -> list[InferEvent]:
    """One Generation as events: [Prefill], a TokenEvent per token, EndEvent when done."""
    events: list[InferEvent] = []
    if with_prefill and generation.prefill_tokens:
        events.append(
            PrefillEvent(list(generation.prefill_tokens), list(generation.prefill_top_tokens))
        )
    tokens = generation.tokens
    tops = generation.top_tokens

    def top(i: int) -> list[Token]:
        return tops[i] if i < len(tops) else []

    if generation.generated_text is None:
        return events + [TokenEvent(t, top(i)) for i, t in enumerate(tokens)]
    if not tokens:
        tokens = [Token(id=0, text="", logprob=None, special=True)]
    *middle, last = tokens
    events += [TokenEvent(t, top(i)) for i, t in enumerate(middle)]
    events.append(
        EndEvent(last, top(len(middle)), generation.generated_text, queued_at, started_at)
    )
    return events
