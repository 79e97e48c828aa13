"""gRPC servicer: decodes protobuf into engine calls and encodes the results; nothing else."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from opentelemetry.trace import SpanKind, Status, StatusCode

from tgserve.env import prefix_caching
from tgserve.memory import trim_heap
from tgserve.pb import generate_pb2 as pb
from tgserve.pb import generate_pb2_grpc as pb_grpc
from tgserve.shard.batch import Batch
from tgserve.shard.generation import Generation, StepTimings, Tokens
from tgserve.shard.generator import Generator, NewRequest, ShardError, warmup
from tgserve.shard.sampling.params import SamplingParams, StoppingParams
from tgserve.tracing import context_from_metadata

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSettings:
    model_type: str
    dtype: str
    max_position_embeddings: int
    kv_budget_bytes: int
    urls: tuple[str, ...]
    rank: int = 0
    world_size: int = 1
    # Batches up to this size get their next decode step computed while the router handles the
    # last one (Generator.decode_ahead); 0 turns it off.
    decode_ahead_max_batch: int = 0


def new_request(p: pb.Request, tokenizer) -> NewRequest:
    ids = list(p.input_ids)
    if not ids:
        ids = tokenizer(p.inputs, add_special_tokens=p.add_special_tokens)["input_ids"]
        if p.truncate:
            ids = ids[-p.truncate :]
    return NewRequest(
        id=p.id,
        input_ids=ids,
        slots=list(p.slots),
        params=SamplingParams.from_pb(p.parameters),
        stopping=StoppingParams.from_pb(p.stopping_parameters),
        top_n_tokens=p.top_n_tokens,
        prefill_logprobs=p.prefill_logprobs,
        cache_len=p.cache_len,
    )


def _tokens_pb(t: Tokens) -> pb.Tokens:
    return pb.Tokens(ids=t.ids, logprobs=t.logprobs, texts=t.texts, is_special=t.is_special)


def generation_pb(g: Generation) -> pb.Generation:
    out = pb.Generation(request_id=g.request_id, tokens=_tokens_pb(g.tokens))
    if g.prefill_tokens is not None:
        out.prefill_tokens.CopyFrom(_tokens_pb(g.prefill_tokens))
    if g.generated_text is not None:
        gt = g.generated_text
        out.generated_text.CopyFrom(
            pb.GeneratedText(text=gt.text, generated_tokens=gt.generated_tokens,
                             # the stubs type an enum field by its own NewType of int
                             finish_reason=int(gt.finish_reason),  # type: ignore[arg-type]
                             seed=gt.seed)
        )
    out.top_tokens.extend(_tokens_pb(t) for t in g.top_tokens)
    out.prefill_top_tokens.extend(_tokens_pb(t) for t in g.prefill_top_tokens)
    return out


def cached_batch_pb(batch: Batch | None) -> pb.CachedBatch | None:
    if batch is None:
        return None
    return pb.CachedBatch(id=batch.id, request_ids=batch.request_ids, size=len(batch),
                          max_tokens=batch.max_tokens, current_tokens=batch.current_tokens)


async def run_in_own_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) on a new thread that has exited by the time this returns.

    Not asyncio.to_thread: the executor's thread would live on, and so would the OpenMP thread
    team that torch's first parallel op there gave it. libgomp counts every team's threads, and
    once they outnumber the cores it stops spinning between parallel regions: each of the ~150
    regions of a decode step then waits on a futex to wake the other thread
    (docs/design/shard-step-thread.md).
    """
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tgserve-warmup")
    future = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    try:
        return await future
    finally:
        # Joins the thread once fn is done, so that its OpenMP team is gone too (libgomp frees it
        # on the thread's way out) before the next step runs; a cancelled await does not block
        # the loop until then.
        executor.shutdown(wait=not future.cancelled())


class TextGenerationService(pb_grpc.TextGenerationServiceServicer):
    """Steps run one at a time on the event loop's own thread, as TGI's shards run them: handing
    each step to a worker thread made every torch op of it hand the GIL back and forth with the
    loop. Health and Info wait for the step in progress, at most one step. Only Warmup, which
    takes tens of seconds, runs on a thread of its own (run_in_own_thread), so that Health answers
    while the shard warms up."""

    def __init__(self, generator: Generator, settings: ShardSettings, tracer: Any = None) -> None:
        self.generator = generator
        self.settings = settings
        self.tracer = tracer  # an OpenTelemetry Tracer when --otlp-endpoint is set
        self._lock = asyncio.Lock()
        self._ahead_tasks: set[asyncio.Task[None]] = set()

    async def _traced_step(
        self, name: str, context, size: int, fn, *args
    ):
        """A step in a span that continues the router's trace (traceparent in the metadata)."""
        if self.tracer is None:
            return await self._run(context, fn, *args)
        parent = context_from_metadata(context.invocation_metadata())
        span = self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes={
            "tgserve.rank": self.settings.rank, "tgserve.batch_size": size})
        try:
            result = await self._run(context, fn, *args)
            timings: StepTimings = result[2]
            span.set_attributes({"tgserve.forward_ns": timings.forward_ns,
                                 "tgserve.decode_ns": timings.decode_ns})
            return result
        except BaseException as e:
            span.set_status(Status(StatusCode.ERROR, str(e) or type(e).__name__))
            raise
        finally:
            span.end()

    async def _run(
        self, context: grpc.aio.ServicerContext, fn, *args, in_thread: bool = False
    ):
        async with self._lock:
            try:
                if not in_thread:
                    return fn(*args)
                return await run_in_own_thread(fn, *args)
            except ShardError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except Exception as e:  # the router gets the message; the shard lives on
                log.exception("step failed")
                await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    async def Info(self, request, context):
        s, g = self.settings, self.generator
        return pb.InfoResponse(
            requires_padding=False, dtype=s.dtype, device_type=g.device.type,
            window_size=g.model.sliding_window, speculate=0, support_chunking=False,
            use_prefix_caching=prefix_caching(), attention_impl="sdpa", block_size=g.block_size,
            max_position_embeddings=s.max_position_embeddings, model_type=s.model_type,
            eos_token_ids=sorted(g.eos_token_ids), vocab_size=g.model.dims.vocab_size,
            mixed_prefill=True,
        )

    async def ServiceDiscovery(self, request, context):
        return pb.ServiceDiscoveryResponse(urls=list(self.settings.urls))

    async def Health(self, request, context):
        torch.zeros(2, 2, device=self.generator.device).sum().item()
        return pb.HealthResponse()

    async def ClearCache(self, request, context):
        async with self._lock:
            self.generator.clear(request.id if request.HasField("id") else None)
        return pb.ClearCacheResponse()

    async def FilterBatch(self, request, context):
        batch = await self._run(context, self.generator.filter, request.batch_id,
                                list(request.request_ids))
        return pb.FilterBatchResponse(batch=cached_batch_pb(batch))

    async def Warmup(self, request, context):
        s = self.settings
        reqs = [new_request(r, self.generator.tokenizer) for r in request.batch.requests]
        max_input = request.max_input_tokens if request.HasField("max_input_tokens") else None
        max_total = request.max_total_tokens if request.HasField("max_total_tokens") else None
        result = await self._run(context, warmup, self.generator, reqs, s.kv_budget_bytes,
                                 s.max_position_embeddings, max_input, max_total, in_thread=True)
        return pb.WarmupResponse(max_supported_total_tokens=result.max_supported_total_tokens,
                                 max_input_tokens=result.max_input_tokens,
                                 max_total_tokens=result.max_total_tokens)

    async def Prefill(self, request, context):
        # With a cached batch, its next tokens are computed in the same forward (mixed prefill).
        running = request.cached_batch.id if request.HasField("cached_batch") else None
        reqs = [new_request(r, self.generator.tokenizer) for r in request.batch.requests]
        result = await self._traced_step("Prefill", context, len(reqs), self.generator.prefill,
                                         request.batch.id, reqs, running)
        # A prefill's activations are freed into glibc's heap, which keeps them for reuse within
        # the step (memory.recycle_step_buffers): trimmed, they are not held once it is done.
        if not self._decode_ahead(result[1], request.decode_ahead, trim=True):
            trim_heap()
        return _step_response(pb.PrefillResponse, *self._owned(*result))

    async def Decode(self, request, context):
        ids = [b.id for b in request.batches]
        size = sum(len(b.request_ids) for b in request.batches)
        result = await self._traced_step("Decode", context, size, self.generator.decode, ids)
        # The step's logits and activations, recycled within the step, go back to the OS:
        # between steps the heap holds only what is live, for a few page faults a step
        # (docs/design/step-buffers-in-heap.md).
        # A small batch that decodes ahead skips it: its step frees a few MB, and the trim would
        # delay the next step, which the router is now waiting for.
        if not self._decode_ahead(result[1], request.decode_ahead, trim=False):
            trim_heap()
        return _step_response(pb.DecodeResponse, *self._owned(*result))

    async def DecodeStream(self, request_iterator, context):
        """Decode steps over one stream the router keeps open, answered in order. A unary call
        costs the shard's thread more in gRPC's C code than a stream message
        (docs/design/decode-stream.md), which at batch 1 is time the next step waits; an error
        ends the stream with the status a unary Decode would have, and the router opens
        another."""
        async for request in request_iterator:
            yield await self.Decode(request, context)

    def _decode_ahead(self, batch: Batch | None, asked: bool, trim: bool) -> bool:
        """Start the batch's next decode step as soon as this answer is on its way, if the router
        asked for it (nothing waits to join) and the batch is small.

        The step runs on the loop's thread once this handler has handed its answer to gRPC, so it
        overlaps the router's handling of the answer and the round trip of the next call; that
        call then finds the step done. One rank only: with several, each would have to start the
        same steps in the same order, and a ClearCache landing first on one of them would leave
        the other waiting in a collective for good.
        """
        s = self.settings
        if not asked or batch is None or s.world_size > 1 or len(batch) > s.decode_ahead_max_batch:
            return False
        task = asyncio.get_running_loop().create_task(self._run_ahead(batch.id, trim))
        self._ahead_tasks.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self._ahead_tasks.discard)
        return True

    async def _run_ahead(self, batch_id: int, trim: bool) -> None:
        async with self._lock:
            if trim:  # a prefill's activations: tens of MB
                trim_heap()
            # A failure is kept with the step and raised to the call that asks for it.
            self.generator.decode_ahead(batch_id)

    def _owned(self, generations: Sequence[Generation], batch: Batch | None,
               timings: StepTimings) -> tuple[list[Generation], Batch | None, StepTimings]:
        """Every rank computes every request; each reports only its share, the router merges."""
        s = self.settings
        if s.world_size == 1:
            return list(generations), batch, timings
        mine = [g for g in generations if g.request_id % s.world_size == s.rank]
        return mine, batch, timings


def _step_response(cls, generations: Sequence[Generation], batch: Batch | None,
                   timings: StepTimings):
    response = cls(
        generations=[generation_pb(g) for g in generations],
        forward_ns=timings.forward_ns, decode_ns=timings.decode_ns, total_ns=timings.total_ns,
    )
    cached = cached_batch_pb(batch)
    if cached is not None:
        response.batch.CopyFrom(cached)
    if timings.concat_ns is not None:
        response.concat_ns = timings.concat_ns
    return response
