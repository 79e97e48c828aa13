"""The router's side of tracing: per-request phase spans, and their traceparent on shard calls."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from tgserve.router.core.batch import Batch, CachedBatch, StepResult
from tgserve.router.shard_client import Metadata
from tgserve.tracing import span_metadata

# A request's phases, in the only order they can happen.
PHASES = ("validation", "queue", "prefill", "decode")


@dataclass(eq=False)
class RequestTrace:
    """One request's span and its current phase's child span (validation → … → decode)."""

    tracer: Tracer
    span: Span
    phase: str = ""
    phase_span: Span | None = None

    @classmethod
    def start(
        cls, tracer: Tracer, name: str, parent: Context | None, attributes: Mapping[str, Any]
    ) -> RequestTrace:
        span = tracer.start_span(name, context=parent, kind=SpanKind.SERVER,
                                 attributes=dict(attributes))
        return cls(tracer, span)

    def enter(self, phase: str) -> None:
        """End the current phase's span and open `phase`'s; phases never go back."""
        if phase not in PHASES or (self.phase and PHASES.index(phase) <= PHASES.index(self.phase)):
            return
        if self.phase_span is not None:
            self.phase_span.end()
        self.phase = phase
        self.phase_span = self.tracer.start_span(
            phase, context=trace.set_span_in_context(self.span)
        )

    def metadata(self) -> list[tuple[str, str]]:
        return span_metadata(self.phase_span or self.span)

    def end(self, attributes: Mapping[str, Any], error: str | None = None) -> None:
        if self.phase_span is not None:
            self.phase_span.end()
            self.phase_span = None
        self.span.set_attributes(dict(attributes))
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()


# Traces of the requests in flight, keyed by id() of the ValidRequest each was scheduled with.
TraceRegistry = dict[int, RequestTrace]
# Which ValidRequest a gRPC request id stands for (None: unknown, e.g. warmup or health):
# Scheduler.request_in_flight in the server.
RequestLookup = Callable[[int], object | None]


@dataclass
class TracedShardClient:
    """Wraps the shard client: each step moves its requests' phases and carries a traceparent.

    The shards' span of a step becomes a child of the phase span of the batch's first traced
    request (a step serves many requests but a span has one parent).
    """

    client: Any  # CoreShardClient
    traces: TraceRegistry
    lookup: RequestLookup = field(default=lambda _id: None)

    def __getattr__(self, name: str) -> Any:
        if name == "client":  # not set yet (copy, pickle): never recurse
            raise AttributeError(name)
        return getattr(self.client, name)

    # The calls the scheduler makes that carry no trace, spelled out for the type checker.
    async def health(self) -> Any:
        return await self.client.health()

    async def clear_cache(self, batch_id: int | None = None) -> Any:
        return await self.client.clear_cache(batch_id)

    async def filter_batch(self, batch_id: int, request_ids: Sequence[int]) -> CachedBatch:
        return await self.client.filter_batch(batch_id, request_ids)

    def _step(self, phase: str, request_ids: Sequence[int]) -> Metadata | None:
        if not self.traces:
            return None
        found = (self.traces.get(id(self.lookup(i))) for i in request_ids)
        traces = [t for t in found if t is not None]
        for t in traces:
            t.enter(phase)
        return traces[0].metadata() if traces else None

    async def prefill(
        self,
        batch: Batch,
        cached_batch: CachedBatch | None = None,
        decode_ahead: bool = False,
    ) -> StepResult:
        metadata = self._step("prefill", [r.id for r in batch.requests])
        return await self.client.prefill(batch, cached_batch, metadata=metadata,
                                         decode_ahead=decode_ahead)

    async def decode(
        self, batches: Sequence[CachedBatch], decode_ahead: bool = False
    ) -> StepResult:
        metadata = self._step("decode", [i for b in batches for i in b.request_ids])
        return await self.client.decode(batches, metadata=metadata, decode_ahead=decode_ahead)
