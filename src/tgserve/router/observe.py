"""One request's life as metrics, trace spans and one log line: Infer's only telemetry hook."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tgserve.router import request_id
from tgserve.router.errors import error_info
from tgserve.router.metrics import Metrics
from tgserve.router.tracing import RequestTrace, TraceRegistry
from tgserve.router.types import GeneratedText, ValidRequest
from tgserve.tracing import context_from_traceparent

log = logging.getLogger("tgserve.router.requests")

# error_type (errors.py maps every error) → the `err` label of tgi_request_failure.
FAILURE_KIND = {
    "validation": "validation",
    "overloaded": "overloaded",
    "generation": "generation",
    "incomplete_generation": "incomplete",
    "incomplete_generation_stream": "incomplete",
    "template_error": "template",
    "missing_template_variable": "template",
    "tool_error": "validation",
    "deadline_unreachable": "deadline",  # DeadlineUnreachableError's code
    "deadline_exceeded": "deadline_expired",
}
REJECTED = ("validation", "overloaded", "deadline")  # refused before they reached the queue


def failure_kind(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "dropped"  # the client went away
    # A finer code on the exception wins (chat.TemplateError is a ValidationError with
    # code "template_error").
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in FAILURE_KIND:
        return FAILURE_KIND[code]
    return FAILURE_KIND.get(error_info(exc).error_type, "generation")


@dataclass
class Telemetry:
    """Where request telemetry goes; the default observes nothing but still logs one line each."""

    metrics: Metrics | None = None
    tracer: Any = None  # opentelemetry Tracer, or None when tracing is off
    log_prompts: bool = False
    traces: TraceRegistry = field(default_factory=dict)

    @contextmanager
    def track(self, inputs: str, stream: bool) -> Iterator[RequestTracker]:
        """Observe one API request; any exception is recorded as its failure and re-raised."""
        tracker = RequestTracker(self, inputs, stream)
        try:
            yield tracker
        except BaseException as exc:
            tracker.finish(exc)
            raise
        tracker.finish(None)

    def request_failed(self, exc: BaseException, inputs: str = "") -> None:
        """For a request that failed before it reached Infer (e.g. a chat template error)."""
        RequestTracker(self, inputs, stream=False).finish(exc)


@dataclass(eq=False)
class RequestTracker:
    """Stamps of one request; Infer reports validation, scheduling, tokens and the end."""

    telemetry: Telemetry
    inputs: str
    stream: bool
    start: float = field(default_factory=time.monotonic)
    request: ValidRequest | None = None
    validated_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    main_request: int | None = None  # id() of the request whose tokens time TTFT and ITL
    generated: GeneratedText | None = None
    queued_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    trace: RequestTrace | None = None

    def __post_init__(self) -> None:
        if self.telemetry.metrics is not None:
            self.telemetry.metrics.request_count.inc()
        tracer = self.telemetry.tracer
        if tracer is not None:
            ctx = request_id.current()
            parent = context_from_traceparent(ctx.traceparent, ctx.tracestate) if ctx else None
            name = f"{ctx.method} {ctx.path}" if ctx and ctx.path else (
                "generate_stream" if self.stream else "generate")
            attributes = {"tgserve.request_id": ctx.request_id} if ctx else {}
            self.trace = RequestTrace.start(tracer, name, parent, attributes)
            self.trace.enter("validation")

    # ---- what Infer reports ----------------------------------------------------------------

    def validated(self, request: ValidRequest) -> None:
        self.request = request
        self.validated_at = time.monotonic()
        m = self.telemetry.metrics
        if m is not None:
            m.request_validation_duration.observe(self.validated_at - self.start)
            m.request_input_length.observe(request.input_length)
            m.request_max_new_tokens.observe(request.stopping.max_new_tokens)
        if self.trace is not None:
            self.trace.enter("queue")

    @contextmanager
    def scheduled(self, request: ValidRequest) -> Iterator[None]:
        """While `request` (or a best_of sibling) is with the backend, its steps find this trace."""
        if self.main_request is None:
            self.main_request = id(request)
        if self.trace is None:
            yield
            return
        self.telemetry.traces[id(request)] = self.trace
        try:
            yield
        finally:
            self.telemetry.traces.pop(id(request), None)

    def token(self, request: ValidRequest) -> None:
        if id(request) != self.main_request:
            return
        now = time.monotonic()
        m = self.telemetry.metrics
        if self.first_token_at is None:
            self.first_token_at = now
            if m is not None:
                m.time_to_first_token.observe(now - self.start)
        elif m is not None and self.last_token_at is not None:
            m.inter_token_latency.observe(now - self.last_token_at)
        self.last_token_at = now

    def ended(self, generated: GeneratedText, queued_at: float, started_at: float) -> None:
        """The chosen generation is complete; stamps come from the backend (monotonic clock)."""
        self.ended_at = time.monotonic()
        self.generated = generated
        self.queued_at = min(max(queued_at, self.start), self.ended_at)
        self.started_at = min(max(started_at, self.queued_at), self.ended_at)

    # ---- the end ---------------------------------------------------------------------------

    def finish(self, exc: BaseException | None) -> None:
        if self.generated is not None:  # a client leaving after the last token changes nothing
            self._succeeded()
        else:
            self._failed(exc if exc is not None else RuntimeError("no final event"))

    def _succeeded(self) -> None:
        assert self.generated is not None and self.ended_at is not None
        assert self.queued_at is not None and self.started_at is not None
        tokens = self.generated.generated_tokens
        inference = self.ended_at - self.started_at
        m = self.telemetry.metrics
        if m is not None:
            m.request_success.inc()
            m.request_duration.observe(self.ended_at - self.start)
            m.request_queue_duration.observe(self.started_at - self.queued_at)
            m.request_inference_duration.observe(inference)
            m.request_mean_time_per_token_duration.observe(inference / max(tokens, 1))
            m.request_generated_tokens.observe(tokens)
        fields = self._fields("ok") | {
            "generated_tokens": tokens,
            "finish_reason": self.generated.finish_reason.value,
            "queue_ms": _ms(self.started_at - self.queued_at),
            "inference_ms": _ms(inference),
            "time_per_token_ms": _ms(inference / max(tokens, 1)),
        }
        if self.first_token_at is not None:
            fields["time_to_first_token_ms"] = _ms(self.first_token_at - self.start)
        self._end_trace(fields, None)
        _log(logging.INFO, self._with_prompts(fields))

    def _failed(self, exc: BaseException) -> None:
        kind = failure_kind(exc)
        m = self.telemetry.metrics
        if m is not None:
            m.request_failure.labels(err=kind).inc()
            if kind in REJECTED:
                m.requests_rejected.labels(reason=kind).inc()
            if kind == "dropped":
                m.requests_cancelled.labels(reason="client_disconnected").inc()
            if kind == "deadline_expired":
                m.requests_cancelled.labels(reason=kind).inc()
        fields = self._fields(kind)
        if kind != "dropped":
            fields["error_type"] = error_info(exc).error_type
            fields["error"] = str(exc)[:300]
        self._end_trace(fields, kind)
        level = logging.WARNING if kind in ("generation", "incomplete") else logging.INFO
        _log(level, self._with_prompts(fields))

    def _fields(self, outcome: str) -> dict[str, Any]:
        now = self.ended_at if self.ended_at is not None else time.monotonic()
        ctx = request_id.current()
        fields: dict[str, Any] = {"outcome": outcome, "stream": self.stream}
        if ctx is not None and ctx.path:
            fields["route"] = f"{ctx.method} {ctx.path}"
        if self.request is not None:
            fields["input_tokens"] = self.request.input_length
            fields["max_new_tokens"] = self.request.stopping.max_new_tokens
        fields["total_ms"] = _ms(now - self.start)
        if self.validated_at is not None:
            fields["validation_ms"] = _ms(self.validated_at - self.start)
        return fields

    def _with_prompts(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Prompts and outputs go into the log line only with --log-prompts (never into spans)."""
        if not self.telemetry.log_prompts:
            return fields
        fields = fields | {"inputs": self.inputs}
        if self.generated is not None:
            fields["generated_text"] = self.generated.text
        return fields

    def _end_trace(self, fields: dict[str, Any], error: str | None) -> None:
        if self.trace is not None:
            self.trace.end({f"tgserve.{k}": v for k, v in fields.items()}, error)


def _ms(seconds: float) -> float:
    return round(max(seconds, 0.0) * 1000, 3)


_QUOTED = ("inputs", "generated_text", "error")


def _log(level: int, fields: dict[str, Any]) -> None:
    text = " ".join(f"{k}={v!r}" if k in _QUOTED else f"{k}={v}" for k, v in fields.items())
    log.log(level, "request %s", text, extra={"fields": fields})
