"""Async gRPC client of the shards: fan-out to every rank; protobuf to and from the core stops here.

`ShardClient` speaks the gRPC contract itself (benchmark-shard uses it as it is); `CoreShardClient`
wraps it for the scheduler and warmup, converting the core's batch types to and from protobuf.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc

from tgserve.pb import generate_pb2, generate_pb2_grpc
from tgserve.router.core.batch import (
    Batch,
    BatchRequest,
    CachedBatch,
    Generation,
    ShardTimings,
    StepResult,
    WarmupResult,
)
from tgserve.router.core.scheduler import SHARD_FAILED
from tgserve.router.types import FinishReason, GeneratedText, GenerationError, ShardInfo, Token

# Batches of long prompts with prefill logprobs exceed gRPC's 4 MiB default by far.
MAX_MESSAGE_LENGTH = 2**31 - 1
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_LENGTH),
    ("grpc.max_receive_message_length", MAX_MESSAGE_LENGTH),
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Stub = generate_pb2_grpc.TextGenerationServiceStub
# gRPC call metadata, e.g. (("traceparent", "00-..."),) so the shards continue the router's trace.
Metadata = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class ShardStep:
    """What a Prefill or Decode returns, still protobuf: every rank's generations, the batch left
    cached, and the timings."""

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
            raise shard_error(err) from err

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
    ) -> ShardStep:
        request = generate_pb2.PrefillRequest(batch=batch, cached_batch=cached_batch,
                                              decode_ahead=decode_ahead)
        return _merge(await self._all(lambda s: s.Prefill(request, metadata=metadata)))

    async def decode(
        self,
        batches: Sequence[generate_pb2.CachedBatch],
        metadata: Metadata | None = None,
        decode_ahead: bool = False,
    ) -> ShardStep:
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
                    raise shard_error(first) from first
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


# The codes the shard's service aborts with, their details its own words for the client (TGI's
# "Server error: ..."). Every other code comes from gRPC itself, whose details name internal
# addresses, such as the shard's socket path: the router's log gets them, clients never do.
_SHARD_WORDS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL})


def shard_error(err: grpc.aio.AioRpcError) -> GenerationError:
    """What a client may read of a failed call to the shards; the whole of it goes to the log."""
    code = err.code()
    log.error("shard call failed: %s: %s", code.name, err.details())
    if code in _SHARD_WORDS and err.details():
        return GenerationError(err.details())
    if code == grpc.StatusCode.UNAVAILABLE:
        return GenerationError("the model shard is unreachable")
    return GenerationError(SHARD_FAILED)


def _unimplemented(error: BaseException) -> bool:
    return isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.UNIMPLEMENTED


def open_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(to_url(address), options=CHANNEL_OPTIONS)


def _merge(
    answers: Sequence[generate_pb2.PrefillResponse | generate_pb2.DecodeResponse],
) -> ShardStep:
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
    return ShardStep(generations, batch, timings)


class CoreShardClient:
    """The shards as the core sees them: its batch types in and out, protobuf only in here."""

    def __init__(self, client: ShardClient) -> None:
        self.client = client

    @classmethod
    async def connect(cls, master_address: str) -> CoreShardClient:
        return cls(await ShardClient.connect(master_address))

    async def close(self) -> None:
        await self.client.close()

    async def service_discovery(self) -> list[str]:
        return await self.client.service_discovery()

    async def health(self) -> None:
        await self.client.health()

    async def clear_cache(self, batch_id: int | None = None) -> None:
        await self.client.clear_cache(batch_id)

    async def info(self, default_block_size: int) -> ShardInfo:
        return shard_info(await self.client.info(), default_block_size)

    async def warmup(
        self,
        batch: Batch,
        max_input_tokens: int | None,
        max_prefill_tokens: int,
        max_total_tokens: int | None,
    ) -> WarmupResult:
        answer = await self.client.warmup(
            to_pb_batch(batch), max_input_tokens, max_prefill_tokens, max_total_tokens
        )
        return to_warmup_result(answer)

    async def filter_batch(self, batch_id: int, request_ids: Sequence[int]) -> CachedBatch:
        return to_cached_batch(await self.client.filter_batch(batch_id, request_ids))

    async def prefill(
        self,
        batch: Batch,
        cached_batch: CachedBatch | None = None,
        decode_ahead: bool = False,
        *,
        metadata: Metadata | None = None,
    ) -> StepResult:
        running = None if cached_batch is None else to_pb_cached_batch(cached_batch)
        step = await self.client.prefill(
            to_pb_batch(batch), running, metadata=metadata, decode_ahead=decode_ahead
        )
        return to_step_result(step)

    async def decode(
        self,
        batches: Sequence[CachedBatch],
        decode_ahead: bool = False,
        *,
        metadata: Metadata | None = None,
    ) -> StepResult:
        step = await self.client.decode(
            [to_pb_cached_batch(b) for b in batches], metadata=metadata, decode_ahead=decode_ahead
        )
        return to_step_result(step)


# ---- the core's types -> protobuf ----------------------------------------------------------


def to_pb_request(r: BatchRequest) -> generate_pb2.Request:
    """The gRPC form of a request, carrying its token ids and KV slots."""
    request = r.request
    allocation = r.allocation
    p = request.parameters
    s = request.stopping
    return generate_pb2.Request(
        id=r.id,
        inputs=request.inputs,
        input_chunks=generate_pb2.Input(chunks=[generate_pb2.InputChunk(text=request.inputs)]),
        input_ids=request.input_ids,
        truncate=request.truncate if request.truncate is not None else request.input_length,
        parameters=generate_pb2.NextTokenChooserParameters(
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            typical_p=p.typical_p,
            do_sample=p.do_sample,
            seed=p.seed,
            repetition_penalty=p.repetition_penalty,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            additive_frequency_penalty=p.additive_frequency_penalty,
            watermark=p.watermark,
            logit_bias=p.logit_bias,
        ),
        stopping_parameters=generate_pb2.StoppingCriteriaParameters(
            max_new_tokens=s.max_new_tokens,
            stop_sequences=s.stop_sequences,
            ignore_eos_token=s.ignore_eos_token,
        ),
        prefill_logprobs=request.decoder_input_details,
        top_n_tokens=request.top_n_tokens,
        blocks=allocation.blocks,
        slots=allocation.slots,
        cache_len=allocation.prefix_len,
        add_special_tokens=request.add_special_tokens,
    )


def to_pb_batch(batch: Batch) -> generate_pb2.Batch:
    return generate_pb2.Batch(
        id=batch.id,
        requests=[to_pb_request(r) for r in batch.requests],
        size=batch.size,
        max_tokens=batch.max_tokens,
        max_blocks=batch.max_blocks,
    )


def to_pb_cached_batch(batch: CachedBatch) -> generate_pb2.CachedBatch:
    return generate_pb2.CachedBatch(
        id=batch.id,
        request_ids=batch.request_ids,
        size=batch.size,
        max_tokens=batch.max_tokens,
        current_tokens=batch.current_tokens,
    )


# ---- protobuf -> the core's types ----------------------------------------------------------

_FINISH_REASONS = {
    generate_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    generate_pb2.FINISH_REASON_EOS_TOKEN: FinishReason.EOS_TOKEN,
    generate_pb2.FINISH_REASON_STOP_SEQUENCE: FinishReason.STOP_SEQUENCE,
}


def to_cached_batch(batch: generate_pb2.CachedBatch) -> CachedBatch:
    return CachedBatch(
        batch.id, tuple(batch.request_ids), batch.size, batch.max_tokens, batch.current_tokens
    )


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


def to_generation(generation: generate_pb2.Generation) -> Generation:
    # The shards send prompt tokens only to the requests that asked for them; HasField first,
    # as it is the cheaper test and nearly always false.
    with_prefill = generation.HasField("prefill_tokens") and len(generation.prefill_tokens.ids) > 0
    return Generation(
        generation.request_id,
        to_tokens(generation.tokens),
        [to_tokens(t) for t in generation.top_tokens],
        to_generated_text(generation.generated_text)
        if generation.HasField("generated_text")
        else None,
        to_tokens(generation.prefill_tokens) if with_prefill else (),
        [to_tokens(t) for t in generation.prefill_top_tokens] if with_prefill else (),
    )


def to_step_result(step: ShardStep) -> StepResult:
    generations = [to_generation(g) for g in step.generations]
    batch = None if step.batch is None else to_cached_batch(step.batch)
    return StepResult(generations, batch, step.timings)


def to_warmup_result(answer: generate_pb2.WarmupResponse) -> WarmupResult:
    supported = (
        answer.max_supported_total_tokens
        if answer.HasField("max_supported_total_tokens")
        else None
    )
    return WarmupResult(supported, answer.max_input_tokens, answer.max_total_tokens)


def shard_info(info: generate_pb2.InfoResponse, default_block_size: int) -> ShardInfo:
    return ShardInfo(
        model_type=info.model_type,
        dtype=info.dtype,
        device_type=info.device_type,
        block_size=info.block_size or default_block_size,
        max_position_embeddings=info.max_position_embeddings,
        eos_token_ids=tuple(info.eos_token_ids),
        vocab_size=info.vocab_size,
        support_chunking=info.support_chunking,
        mixed_prefill=info.mixed_prefill,
        prefix_caching=info.use_prefix_caching,
        window_size=info.window_size if info.HasField("window_size") else None,
        speculate=info.speculate,
    )
