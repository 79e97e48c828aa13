"""OpenTelemetry set-up shared by every process: OTLP/gRPC export, W3C traceparent in and out."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

PROPAGATOR = TraceContextTextMapPropagator()
# Spans reach the collector within about this long; TGI's exporter default is 5 s.
EXPORT_DELAY_MS = 1000


@dataclass
class Tracing:
    """A tracer of our own (no global provider), and the provider to flush at exit."""

    tracer: Tracer
    provider: Any  # opentelemetry.sdk.trace.TracerProvider

    def shutdown(self) -> None:
        try:
            self.provider.shutdown()
        except Exception:  # noqa: BLE001 - a dead collector must not fail the shutdown
            log.warning("flushing traces failed", exc_info=True)


def setup_tracing(endpoint: str | None, service_name: str) -> Tracing | None:
    """OTLP over gRPC to `endpoint` (e.g. http://127.0.0.1:4317), every span sampled; None: off."""
    if not endpoint:
        return None
    # The SDK is imported only when tracing is on: it costs start-up time otherwise.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    insecure = not endpoint.startswith("https://")
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}), sampler=ALWAYS_ON
    )
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=insecure)
    provider.add_span_processor(
        BatchSpanProcessor(exporter, schedule_delay_millis=EXPORT_DELAY_MS)
    )
    log.info("exporting traces to %s as %r", endpoint, service_name)
    return Tracing(provider.get_tracer("tgserve"), provider)


def context_from_traceparent(
    traceparent: str | None, tracestate: str | None = None
) -> Context | None:
    """The remote parent a W3C `traceparent` names; None when absent or malformed."""
    if not traceparent:
        return None
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    context = PROPAGATOR.extract(carrier)
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


def context_from_metadata(metadata: Sequence[tuple[str, Any]] | None) -> Context | None:
    """The parent context the router put into a gRPC call's metadata (shard side)."""
    found: dict[str, str] = {}
    for key, value in metadata or ():
        if key in ("traceparent", "tracestate"):
            found[key] = value.decode() if isinstance(value, bytes) else str(value)
    return context_from_traceparent(found.get("traceparent"), found.get("tracestate"))


def span_metadata(span: Span) -> list[tuple[str, str]]:
    """`span` as gRPC metadata, so that the callee's spans become its children."""
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return sorted(carrier.items())
