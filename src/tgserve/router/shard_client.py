"""Async gRPC client for the shards: every call fans out to all ranks and the answers are merged."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc

from tgserve.pb import generate_pb2, generate_pb2_grpc
from tgserve.router.types import (
    EndEvent,
    FinishReason,
    GeneratedText,
    GenerationError,
    InferEvent,
    PrefillEvent,
    Token,
    TokenEvent,
)

# Batches of long prompts with prefill logprobs exceed gRPC's 4 MiB default by far.
MAX_MESSAGE_LENGTH = 2**31 - 1
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_LENGTH),
    ("grpc.max_receive_message_length", MAX_MESSAGE_LENGTH),
)

T = TypeVar("T")
Stub = generate_pb2_grpc.TextGenerationServiceStub
# gRPC call metadata, e.g. (("traceparent", "00-..."),) so the shards continue the router's trace.
Metadata = Sequence[tuple[str, str]]


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

    generations: list[generate_pb2.Generation]
    batch: generate_pb2.CachedBatch | None
    timings: ShardTimings


def to_url(address: str) -> str:
    """A unix socket path or an address that already names its scheme."""
    return address if "://" in address or address.startswith("unix:") else f"unix://{address}"


class ShardClient:
    """One channel per rank; a call succeeds only if every rank answers."""

    def __init__(self, channels: Sequence[grpc.aio.Channel]) -> None:
        if not channels:
            raise ValueError("a ShardClient needs at least one channel")
        self._channels = list(channels)
        self._stubs = [Stub(channel) for channel in self._channels]
        # One open DecodeStream per rank, opened on first use; None after an error, and for good
        # (unary Decode calls) once a shard answers that it has no such method.
        self._decode_streams: list[grpc.aio.StreamStreamCall | None] = [None] * len(self._stubs)
        self._streaming = True

    @classmethod
    async def connect(cls, master_address: str) -> ShardClient:
        """Connect to rank 0, ask it for every rank's address, then open one channel per rank."""
        bootstrap = cls([open_channel(master_address)])
        try:
            urls = await bootstrap.service_discovery()
        finally:
            await bootstrap.close()
        return cls([open_channel(url) for url in urls])

    @property
    def world_size(self) -> int:
        return len(self._stubs)

    async def close(self) -> None:
        for rank in range(len(self._stubs)):
            self._drop_stream(rank)
        await asyncio.gather(*(channel.close() for channel in self._channels))

    async def _all(self, call: Callable[[Stub], Awaitable[T]]) -> list[T]:
        try:
            return list(await asyncio.gather(*(call(stub) for stub in self._stubs)))
        except grpc.aio.AioRpcError as err:
            raise GenerationError(err.details() or str(err.code())) from err

    async def service_discovery(self) -> list[str]:
        answers = await self._all(
            lambda s: s.ServiceDiscovery(generate_pb2.ServiceDiscoveryRequest())
        )
        return list(answers[0].urls)

    async def info(self) -> generate_pb2.InfoResponse:
        answers = await self._all(lambda s: s.Info(generate_pb2.InfoRequest()))
        return answers[-1]

    async def health(self) -> None:
        await self._all(lambda s: s.Health(generate_pb2.HealthRequest()))

    async def clear_cache(self, batch_id: int | None = None) -> None:
        request = generate_pb2.ClearCacheRequest(id=batch_id)
        await self._all(lambda s: s.ClearCache(request))

    async def filter_batch(
        self, batch_id: int, request_ids: Sequence[int]
    ) -> generate_pb2.CachedBatch:
        request = generate_pb2.FilterBatchRequest(batch_id=batch_id, request_ids=request_ids)
        answers = await self._all(lambda s: s.FilterBatch(request))
        return answers[0].batch

    async def warmup(
        self,
        batch: generate_pb2.Batch,
        max_input_tokens: int | None,
        max_prefill_tokens: int,
        max_total_tokens: int | None,
    ) -> generate_pb2.WarmupResponse:
        """Every rank runs the batch; the answer is what the smallest rank can hold."""
        request = generate_pb2.WarmupRequest(
            batch=batch,
            max_input_tokens=max_input_tokens,
            max_prefill_tokens=max_prefill_tokens,
            max_total_tokens=max_total_tokens,
        )
        answers = await self._all(lambda s: s.Warmup(request))
        supported = [
            a.max_supported_total_tokens
            for a in answers
            if a.HasField("max_supported_total_tokens")
        ]
        return generate_pb2.WarmupResponse(
            max_supported_total_tokens=min(supported) if supported else None,
            max_input_tokens=min(a.max_input_tokens for a in answers),
            max_total_tokens=min(a.max_total_tokens for a in answers),
        )

    async def prefill(
        self,
        batch: generate_pb2.Batch,
        cached_batch: generate_pb2.CachedBatch | None = None,
        metadata: Metadata | None = None,
        decode_ahead: bool = False,
    ) -> StepResult:
        request = generate_pb2.PrefillRequest(batch=batch, cached_batch=cached_batch,
                                              decode_ahead=decode_ahead)
        return _merge(await self._all(lambda s: s.Prefill(request, metadata=metadata)))

    async def decode(
        self,
        batches: Sequence[generate_pb2.CachedBatch],
        metadata: Metadata | None = None,
        decode_ahead: bool = False,
    ) -> StepResult:
        request = generate_pb2.DecodeRequest(batches=batches, decode_ahead=decode_ahead)
        # A traced step goes as a unary call: its span's parent travels in the call's metadata.
        if self._streaming and metadata is None:
            answers = await asyncio.gather(
                *(self._decode_over_stream(rank, request) for rank in range(len(self._stubs))),
                return_exceptions=True,
            )
            errors = [a for a in answers if isinstance(a, BaseException)]
            if not errors:
                return _merge(answers)  # type: ignore[arg-type]
            # A shard without DecodeStream: unary calls from now on, and this step again too
            # unless some rank has already run it over its stream.
            if any(_unimplemented(e) for e in errors):
                self._streaming = False
            if len(errors) < len(answers) or not all(_unimplemented(e) for e in errors):
                first = errors[0]
                if isinstance(first, grpc.aio.AioRpcError):
                    raise GenerationError(first.details() or str(first.code())) from first
                raise first
        return _merge(await self._all(lambda s: s.Decode(request, metadata=metadata)))

    async def _decode_over_stream(
        self, rank: int, request: generate_pb2.DecodeRequest
    ) -> generate_pb2.DecodeResponse:
        stream = self._decode_streams[rank]
        if stream is None:
            stream = self._decode_streams[rank] = self._stubs[rank].DecodeStream()
        try:
            await stream.write(request)
            response = await stream.read()
        except BaseException:
            # An error ends the stream; a cancelled step would leave its answer unread, and the
            # next step would read it as its own: either way the stream is done.
            self._drop_stream(rank)
            raise
        if response is grpc.aio.EOF:  # the shard closed it without an error status
            self._drop_stream(rank)
            raise GenerationError(f"rank {rank} closed its decode stream")
        return response

    def _drop_stream(self, rank: int) -> None:
        stream, self._decode_streams[rank] = self._decode_streams[rank], None
        if stream is not None:
            stream.cancel()


def _unimplemented(error: BaseException) -> bool:
    return isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.UNIMPLEMENTED


def open_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(to_url(address), options=CHANNEL_OPTIONS)


def _merge(
    answers: Sequence[generate_pb2.PrefillResponse | generate_pb2.DecodeResponse],
) -> StepResult:
    # Each rank answers for its own requests (id % world_size == rank); together they are all.
    generations = [g for answer in answers for g in answer.generations]
    first = answers[0]
    batch = first.batch if first.HasField("batch") else None
    concat = [a.concat_ns for a in answers if a.HasField("concat_ns")]
    timings = ShardTimings(
        forward_ns=max(a.forward_ns for a in answers),
        decode_ns=max(a.decode_ns for a in answers),
        total_ns=max(a.total_ns for a in answers),
        concat_ns=max(concat) if concat else None,
        forward_ns_per_shard=tuple(a.forward_ns for a in answers),
    )
    return StepResult(generations, batch, timings)


# ---- proto answers -> the router's event types ---------------------------------------------

_FINISH_REASONS = {
    generate_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    generate_pb2.FINISH_REASON_EOS_TOKEN: FinishReason.EOS_TOKEN,
    generate_pb2.FINISH_REASON_STOP_SEQUENCE: FinishReason.STOP_SEQUENCE,
}


def to_tokens(tokens: generate_pb2.Tokens) -> list[Token]:
    """Parallel lists to Token objects; a missing or NaN logprob becomes None."""
    out = []
    for i, token_id in enumerate(tokens.ids):
        logprob = tokens.logprobs[i] if i < len(tokens.logprobs) else None
        out.append(
            Token(
                id=token_id,
                text=tokens.texts[i] if i < len(tokens.texts) else "",
                logprob=None if logprob is None or math.isnan(logprob) else logprob,
                special=bool(tokens.is_special[i]) if i < len(tokens.is_special) else False,
            )
        )
    return out


def to_generated_text(gt: generate_pb2.GeneratedText) -> GeneratedText:
    return GeneratedText(
        text=gt.text,
        generated_tokens=gt.generated_tokens,
        finish_reason=_FINISH_REASONS.get(gt.finish_reason, FinishReason.LENGTH),
        seed=gt.seed if gt.HasField("seed") else None,
    )


def generation_events(
    generation: generate_pb2.Generation, with_prefill: bool, queued_at: float, started_at: float
) -> list[InferEvent]:
    """One shard Generation as events: [Prefill], a TokenEvent per token, EndEvent when done."""
    events: list[InferEvent] = []
    if with_prefill and generation.prefill_tokens.ids:
        prompt_tops = [to_tokens(t) for t in generation.prefill_top_tokens]
        events.append(PrefillEvent(to_tokens(generation.prefill_tokens), prompt_tops))
    tokens = to_tokens(generation.tokens)
    tops = [to_tokens(t) for t in generation.top_tokens]

    def top(i: int) -> list[Token]:
        return tops[i] if i < len(tops) else []

    if not generation.HasField("generated_text"):
        return events + [TokenEvent(t, top(i)) for i, t in enumerate(tokens)]
    if not tokens:
        tokens = [Token(id=0, text="", logprob=None, special=True)]
    *middle, last = tokens
    events += [TokenEvent(t, top(i)) for i, t in enumerate(middle)]
    generated = to_generated_text(generation.generated_text)
    events.append(EndEvent(last, top(len(middle)), generated, queued_at, started_at))
    return events
