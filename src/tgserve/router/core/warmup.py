"""Start-up: warm the shards up with the largest batch, then resolve and check the token limits."""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from tgserve.router.core.batch import Batch, BatchRequest, WarmupResult
from tgserve.router.core.blocks import BlockAllocator
from tgserve.router.core.scheduler import DUMMY_TOKEN_ID, SchedulerSettings
from tgserve.router.types import (
    SamplingParameters,
    ShardInfo,
    StoppingParameters,
    ValidRequest,
)


class StartupError(RuntimeError):
    """The shards and the configured limits cannot work together."""


class WarmupBackend(Protocol):
    """The part of CoreShardClient that start-up uses (tests pass a fake)."""

    async def service_discovery(self) -> list[str]: ...
    async def clear_cache(self, batch_id: int | None = None) -> None: ...
    async def info(self, default_block_size: int) -> ShardInfo: ...
    async def warmup(
        self,
        batch: Batch,
        max_input_tokens: int | None,
        max_prefill_tokens: int,
        max_total_tokens: int | None,
    ) -> WarmupResult: ...


def warmup_pieces(settings: SchedulerSettings, info: ShardInfo) -> list[int]:
    """Prompt lengths that add up to max_batch_prefill_tokens, none over max_input_tokens."""
    budget = settings.max_batch_prefill_tokens
    max_input = settings.max_input_tokens or budget
    if info.max_position_embeddings > 1:
        max_input = min(max_input, info.max_position_embeddings - 1)
    pieces: list[int] = []
    while sum(pieces) < budget and (
        settings.max_batch_size is None or len(pieces) < settings.max_batch_size
    ):
        pieces.append(min(max_input, budget - sum(pieces)))
    return pieces


def warmup_batch(settings: SchedulerSettings, info: ShardInfo) -> Batch:
    """The largest prefill the router will send, with TGI's costliest sampling parameters."""
    params = SamplingParameters(
        temperature=0.9, top_k=10, top_p=0.9, typical_p=0.9, do_sample=False, seed=0,
        repetition_penalty=1.2, frequency_penalty=0.1, watermark=True,
    )
    top_n = min(20, info.vocab_size) if info.vocab_size else 20
    pieces = warmup_pieces(settings, info)
    requests = []
    for request_id, n in enumerate(pieces):
        # Without a known max_total_tokens, two new tokens still exercise prefill and decode.
        max_new = max(settings.max_total_tokens - n, 1) if settings.max_total_tokens else 2
        request = ValidRequest(
            inputs="_test " * n,
            input_ids=(DUMMY_TOKEN_ID,) * n,
            parameters=params,
            stopping=StoppingParameters(max_new_tokens=max_new, ignore_eos_token=True),
            top_n_tokens=top_n,
            decoder_input_details=True,
            truncate=n,
        )
        requests.append((request_id, request, n + max_new - 1 + info.speculate))
    allocator = BlockAllocator(1 + sum(-(-t // info.block_size) for *_, t in requests),
                               info.block_size)
    batch_requests = []
    for request_id, request, tokens in requests:
        allocation = allocator.allocate(tokens)
        assert allocation is not None, "the warmup allocator is sized for every request"
        batch_requests.append(BatchRequest(request_id, request, allocation))
    return Batch(
        id=0,
        requests=batch_requests,
        size=len(batch_requests),
        max_tokens=sum(
            r.request.input_length + r.request.stopping.max_new_tokens for r in batch_requests
        ),
        max_blocks=max((len(r.allocation.blocks) for r in batch_requests), default=0),
    )


async def connect_and_warmup(
    client: WarmupBackend, settings: SchedulerSettings
) -> tuple[ShardInfo, int, int, int]:
    """ServiceDiscovery, ClearCache, Info, Warmup; returns the limits the router must enforce.

    Returns (info, max_batch_total_tokens, max_input_tokens, max_total_tokens); build the
    Scheduler with `resolve_settings(...)` so its allocator matches what the shards hold.
    """
    await client.service_discovery()
    await client.clear_cache(None)
    info = await client.info(settings.block_size)
    answer = await client.warmup(
        warmup_batch(settings, info),
        settings.max_input_tokens,
        settings.max_batch_prefill_tokens,
        settings.max_total_tokens,
    )
    return (info, *resolve_limits(settings, info, answer))


def resolve_limits(
    settings: SchedulerSettings, info: ShardInfo, answer: WarmupResult
) -> tuple[int, int, int]:
    """(max_batch_total_tokens, max_input_tokens, max_total_tokens) after warmup, checked."""
    if answer.max_supported_total_tokens is not None:
        batch_total = answer.max_supported_total_tokens
    else:
        batch_total = settings.max_batch_total_tokens
    max_total = answer.max_total_tokens or settings.max_total_tokens or batch_total
    max_input = answer.max_input_tokens or settings.max_input_tokens or max_total - 1
    # Block 0 is reserved, so one request can use at most this many KV tokens.
    usable = (batch_total // info.block_size - 1) * info.block_size - info.speculate
    if max_total - 1 > usable:
        if settings.max_total_tokens is not None:
            raise StartupError(f"Not enough memory to handle max_total_tokens={max_total}")
        max_total = usable + 1
    if not info.support_chunking and max_input > settings.max_batch_prefill_tokens:
        if settings.max_input_tokens is not None:
            raise StartupError(
                f"`max_batch_prefill_tokens` must be >= `max_input_tokens`. Given: "
                f"{settings.max_batch_prefill_tokens} and {max_input}"
            )
        max_input = settings.max_batch_prefill_tokens
    if settings.max_input_tokens is None:
        max_input = min(max_input, max_total - 1)
    if max_input < 1 or max_input >= max_total:
        raise StartupError(
            f"`max_input_tokens`({max_input}) must be < `max_total_tokens`({max_total})"
        )
    if settings.max_batch_prefill_tokens > batch_total:
        raise StartupError(
            f"`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`. Given: "
            f"{settings.max_batch_prefill_tokens} and {batch_total}"
        )
    return batch_total, max_input, max_total


def resolve_settings(
    settings: SchedulerSettings, info: ShardInfo, limits: tuple[int, int, int]
) -> SchedulerSettings:
    """The settings a Scheduler needs after warmup: the shards' block size and KV capacity."""
    batch_total, max_input, max_total = limits
    return replace(
        settings,
        max_batch_total_tokens=batch_total,
        block_size=info.block_size,
        max_input_tokens=max_input,
        max_total_tokens=max_total,
    )
