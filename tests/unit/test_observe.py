"""Request telemetry without a server: metrics per outcome, request ids, log lines, spans."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from opentelemetry import trace as otel
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_native_api import FakeBackend, tokenizer  # noqa: F401 - fixture
from tgserve.launcher.supervisor import resolved, router_command, shard_command
from tgserve.launcher.weights import ModelSource
from tgserve.logs import JsonFormatter, ReadableFormatter
from tgserve.router.app import create_app
from tgserve.router.core.batch import Batch, BatchRequest, CachedBatch
from tgserve.router.core.blocks import BlockAllocation
from tgserve.router.errors import ValidationError
from tgserve.router.infer import Infer
from tgserve.router.metrics import Metrics, exposition
from tgserve.router.native.schemas import GenerateRequest
from tgserve.router.observe import Telemetry
from tgserve.router.request_id import RequestIdFilter
from tgserve.router.settings import RouterSettings
from tgserve.router.tokenization import RouterTokenizer
from tgserve.router.tracing import RequestTrace, TracedShardClient
from tgserve.router.types import (
    GenerationError,
    SamplingParameters,
    StoppingParameters,
    Token,
    TokenEvent,
    ValidRequest,
)
from tgserve.tracing import context_from_metadata, context_from_traceparent

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


class Setup:
    def __init__(self, tokenizer: RouterTokenizer, backend: FakeBackend | None = None,  # noqa: F811
                 max_concurrent: int = 128, tracer: Any = None, log_prompts: bool = False):
        self.registry = CollectorRegistry()
        self.metrics = Metrics.create(100, 128, self.registry)
        self.telemetry = Telemetry(self.metrics, tracer, log_prompts)
        self.backend = backend or FakeBackend()
        config = RouterSettings(model_id="tiny", max_input_tokens=100, max_total_tokens=128,
                                max_concurrent_requests=max_concurrent)
        self.infer = Infer(self.backend, tokenizer, config.limits(), max_concurrent,
                           telemetry=self.telemetry)
        self.client = TestClient(create_app(self.infer, {}, config))

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


def test_counters_and_histograms_per_outcome(tokenizer: RouterTokenizer) -> None:  # noqa: F811
    s = Setup(tokenizer)
    ok = s.client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 5}})
    assert ok.status_code == 200
    with s.client.stream("POST", "/generate_stream", json={"inputs": "hello world"}) as r:
        assert sum(1 for line in r.iter_lines() if line.startswith("data:")) == 3
    bad = s.client.post("/generate", json={"inputs": "hello", "parameters": {"temperature": -1}})
    assert bad.status_code == 422
    assert s.value("tgi_request_count_total") == 3
    assert s.value("tgi_request_success_total") == 2
    assert s.value("tgi_request_failure_total", err="validation") == 1
    assert s.value("tgserve_requests_rejected_total", reason="validation") == 1
    assert s.value("tgi_request_duration_count") == 2
    assert s.value("tgi_request_generated_tokens_sum") == 6  # the fake always makes 3
    assert s.value("tgi_request_input_length_sum") == 2 + 3  # <s> hello, <s> hello world
    assert s.value("tgi_request_max_new_tokens_count") == 2
    assert s.value("tgi_request_validation_duration_count") == 2
    assert s.value("tgi_request_queue_duration_count") == 2
    assert s.value("tgi_request_mean_time_per_token_duration_count") == 2
    assert s.value("tgserve_request_time_to_first_token_seconds_count") == 2
    assert s.value("tgserve_request_inter_token_latency_seconds_count") == 4  # 2 gaps each


def test_overloaded_and_generation_errors(tokenizer: RouterTokenizer) -> None:  # noqa: F811
    s = Setup(tokenizer, max_concurrent=0)
    assert s.client.post("/generate", json={"inputs": "hello"}).status_code == 429
    assert s.value("tgi_request_failure_total", err="overloaded") == 1
    assert s.value("tgserve_requests_rejected_total", reason="overloaded") == 1
    failing = FakeBackend(lambda request, call: [GenerationError("shard died")])
    s = Setup(tokenizer, failing)
    assert s.client.post("/generate", json={"inputs": "hello"}).status_code == 424
    assert s.value("tgi_request_failure_total", err="generation") == 1
    assert s.value("tgserve_requests_rejected_total", reason="validation") == 0


def test_cancelled_request_counts_once(tokenizer: RouterTokenizer) -> None:  # noqa: F811
    one_token = FakeBackend(lambda request, call: [TokenEvent(Token(4, " world", -0.5), [])],
                            hang=True)
    s = Setup(tokenizer, one_token)

    async def run() -> None:
        task = asyncio.ensure_future(s.infer.generate(GenerateRequest(inputs="hello")))
        while not s.value("tgserve_request_time_to_first_token_seconds_count"):
            await asyncio.sleep(0)  # until the one token has reached Infer
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert s.value("tgi_request_failure_total", err="dropped") == 1
    assert s.value("tgserve_requests_cancelled_total", reason="client_disconnected") == 1
    assert s.value("tgi_request_success_total") == 0
    assert s.value("tgserve_request_time_to_first_token_seconds_count") == 1
    assert s.backend.closed == 1


def test_exposition_uses_tgi_bare_counter_names() -> None:
    registry = CollectorRegistry()
    m = Metrics.create(10, 20, registry)
    m.request_count.inc(3)
    m.requests_cancelled.labels(reason="client_disconnected").inc()
    text = exposition(registry).decode()
    assert "# TYPE tgi_request_count counter\ntgi_request_count 3.0\n" in text
    assert "tgserve_requests_cancelled_total{reason=\"client_disconnected\"} 1.0" in text
    assert "_created" not in text and "tgi_request_count_total" not in text
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families["tgi_request_count"] == "counter"
    assert families["tgi_request_duration"] == "histogram"
    assert families["tgi_queue_size"] == "gauge"


def test_request_id_echoed_generated_and_logged(
    tokenizer: RouterTokenizer, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    s = Setup(tokenizer)
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO, logger="tgserve.router.requests"):
        given = s.client.post("/generate", json={"inputs": "hello"},
                              headers={"X-Request-Id": "abc-123"})
        made = s.client.get("/health")
        refused = s.client.post("/generate", json={"inputs": "hello"},
                                headers={"X-Request-Id": "bad id\twith space"})
    assert given.headers["x-request-id"] == "abc-123"
    assert len(made.headers["x-request-id"]) == 32
    assert refused.headers["x-request-id"] not in ("", "bad id\twith space")
    lines = [r for r in caplog.records if r.name == "tgserve.router.requests"]
    assert [r.request_id for r in lines] == ["abc-123", refused.headers["x-request-id"]]
    fields = lines[0].fields
    assert fields["outcome"] == "ok" and fields["generated_tokens"] == 3
    assert fields["input_tokens"] == 2 and "inputs" not in fields
    assert "generated_text" not in fields and "hello" not in lines[0].getMessage()


def test_prompts_logged_only_when_asked(
    tokenizer: RouterTokenizer, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    s = Setup(tokenizer, log_prompts=True)
    with caplog.at_level(logging.INFO, logger="tgserve.router.requests"):
        s.client.post("/generate", json={"inputs": "hello"})
    record = next(r for r in caplog.records if r.name == "tgserve.router.requests")
    assert record.fields["inputs"] == "hello"
    assert record.fields["generated_text"] == " world again"


def test_formatters_carry_request_id_and_fields() -> None:
    record = logging.LogRecord("tgserve.router.requests", logging.INFO, __file__, 1,
                               "request %s", ("outcome=ok",), None)
    record.request_id = "r-1"
    record.fields = {"outcome": "ok", "generated_tokens": 3}
    entry = json.loads(JsonFormatter("router").format(record))
    assert entry["request_id"] == "r-1" and entry["fields"]["generated_tokens"] == 3
    assert entry["message"] == "request outcome=ok"
    assert "[r-1]" in ReadableFormatter("router").format(record)


def memory_tracer() -> tuple[Any, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def test_request_span_continues_the_clients_trace(tokenizer: RouterTokenizer) -> None:  # noqa: F811
    tracer, exporter = memory_tracer()
    s = Setup(tokenizer, tracer=tracer)
    r = s.client.post("/generate", json={"inputs": "hello"}, headers={"traceparent": TRACEPARENT})
    assert r.status_code == 200
    spans = {span.name: span for span in exporter.get_finished_spans()}
    root = spans["POST /generate"]
    assert format(root.context.trace_id, "032x") == TRACE_ID
    assert root.parent is not None and format(root.parent.span_id, "016x") == PARENT_ID
    for phase in ("validation", "queue"):  # prefill/decode come from the shard client wrapper
        assert spans[phase].parent.span_id == root.context.span_id
        assert spans[phase].context.trace_id == root.context.trace_id
    assert root.attributes["tgserve.generated_tokens"] == 3
    assert root.attributes["tgserve.request_id"] == r.headers["x-request-id"]


def test_malformed_traceparent_starts_a_new_trace() -> None:
    assert context_from_traceparent("00-zz-yy-01") is None
    assert context_from_traceparent(None) is None
    assert context_from_traceparent(TRACEPARENT) is not None


def batch_of(batch_id: int, request_ids: list[int]) -> Batch:
    """A new batch of `request_ids`, their contents irrelevant to tracing."""
    request = ValidRequest(inputs="x", input_ids=(1,), parameters=SamplingParameters(),
                           stopping=StoppingParameters(max_new_tokens=1))
    allocation = BlockAllocation(0, (1,), (4,))
    requests = [BatchRequest(i, request, allocation) for i in request_ids]
    return Batch(batch_id, requests, len(requests), 2 * len(requests), 1)


class RecordingClient:
    def __init__(self) -> None:
        self.metadata: list[Any] = []

    async def prefill(self, batch: Any, cached_batch: Any = None, metadata: Any = None,
                      decode_ahead: bool = False) -> str:
        self.metadata.append(metadata)
        return "prefilled"

    async def decode(self, batches: Any, metadata: Any = None, decode_ahead: bool = False) -> str:
        self.metadata.append(metadata)
        return "decoded"

    async def health(self) -> str:
        return "healthy"


def test_traced_client_moves_phases_and_sends_traceparent() -> None:
    tracer, exporter = memory_tracer()
    requests = {7: object(), 8: object()}
    traces = {id(requests[7]): RequestTrace.start(tracer, "req", None, {})}
    traces[id(requests[7])].enter("queue")
    inner = RecordingClient()
    client = TracedShardClient(inner, traces, requests.get)
    batch = batch_of(1, [8, 7])

    async def run() -> None:
        assert await client.prefill(batch) == "prefilled"
        cached = CachedBatch(id=1, request_ids=(7, 8), size=2, max_tokens=4)
        assert await client.decode([cached]) == "decoded"
        assert await client.health() == "healthy"  # everything else passes through

    asyncio.run(run())
    trace = traces[id(requests[7])]
    assert trace.phase == "decode"
    trace.end({})
    spans = {span.name: span for span in exporter.get_finished_spans()}
    for metadata, phase in zip(inner.metadata, ("prefill", "decode")):
        parent = context_from_metadata(metadata)
        assert parent is not None
        sent = otel.get_current_span(parent).get_span_context()
        assert sent.span_id == spans[phase].context.span_id
        assert spans[phase].parent.span_id == spans["req"].context.span_id


def test_no_traces_means_no_metadata() -> None:
    inner = RecordingClient()
    client = TracedShardClient(inner, {}, lambda i: None)
    asyncio.run(client.prefill(batch_of(0, [1])))
    assert inner.metadata == [None]


def test_launcher_passes_tracing_and_prompt_flags() -> None:
    from tgserve.config import Config
    from tgserve.env import CONFIG_VARIABLE
    from tgserve.launcher.args import parse

    source = ModelSource(model_id="m", path=Path("/m"), gguf_file=None, revision=None)
    config = resolved(parse(["--otlp-endpoint", "http://127.0.0.1:4317", "--log-prompts"]),
                      source, 1)
    shard = Config.from_json(shard_command(config, 0)[1][CONFIG_VARIABLE])
    assert shard.otlp_endpoint == "http://127.0.0.1:4317"
    assert shard.shard_service_name == "text-generation-inference.server"
    router = Config.from_json(router_command(config)[1][CONFIG_VARIABLE])
    assert router.log_prompts and router.otlp_endpoint == "http://127.0.0.1:4317"
    assert router.otlp_service_name == "text-generation-inference.router"
    assert not parse([]).log_prompts
    assert Config(otlp_service_name="mine").shard_service_name == "mine.server"


ROOT = Path(__file__).resolve().parents[2]


def declared_metrics() -> set[str]:
    registry = CollectorRegistry()
    Metrics.create(10, 20, registry)
    return {family.name for family in registry.collect()}


def test_docs_list_every_metric() -> None:
    text = (ROOT / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `((?:tgi|tgserve)_\w+)`", text, re.M))
    documented = {name.removesuffix("_total") for name in documented}
    assert documented == declared_metrics()


def test_dashboard_queries_only_declared_metrics() -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana" / "tgserve.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {re.sub(r"_(bucket|sum|count|total)$", "", name)
            for e in exprs for name in re.findall(r"\b(?:tgi|tgserve)_\w+", e)}
    declared = declared_metrics()
    # A histogram's own name may end in _count (tgi_batch_inference_count is a counter).
    unknown = {n for n in used if n not in declared and n + "_count" not in declared}
    assert not unknown and len(used) >= 25


def test_failure_kinds() -> None:
    from tgserve.router.observe import failure_kind
    from tgserve.router.types import IncompleteGenerationError, OverloadedError

    template = ValidationError("no template")
    template.code = "template_error"  # what chat.TemplateError carries
    assert failure_kind(template) == "template"
    assert failure_kind(ValidationError("x")) == "validation"
    assert failure_kind(OverloadedError()) == "overloaded"
    assert failure_kind(IncompleteGenerationError()) == "incomplete"
    assert failure_kind(asyncio.CancelledError()) == "dropped"
    assert failure_kind(RuntimeError("bug")) == "generation"


def test_request_failed_outside_infer_counts_a_request() -> None:
    registry = CollectorRegistry()
    telemetry = Telemetry(Metrics.create(10, 20, registry))
    telemetry.request_failed(ValidationError("bad template"))
    assert registry.get_sample_value("tgi_request_count_total") == 1
    assert registry.get_sample_value("tgi_request_failure_total", {"err": "validation"}) == 1
