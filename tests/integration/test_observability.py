"""One live server with --json-output and --otlp-endpoint: metrics, traces, request ids, logs."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SMALL_LIMITS
from tests.integration.server import LaunchedServer

pytestmark = pytest.mark.slow

# Every metric docs/metrics.md lists, by family name, with its Prometheus type.
METRIC_TYPES = {
    "tgi_request_count": "counter",
    "tgi_request_success": "counter",
    "tgi_request_failure": "counter",
    "tgi_request_duration": "histogram",
    "tgi_request_validation_duration": "histogram",
    "tgi_request_queue_duration": "histogram",
    "tgi_request_inference_duration": "histogram",
    "tgi_request_mean_time_per_token_duration": "histogram",
    "tgi_request_generated_tokens": "histogram",
    "tgi_request_input_length": "histogram",
    "tgi_request_max_new_tokens": "histogram",
    "tgi_request_skipped_tokens": "histogram",
    "tgi_queue_size": "gauge",
    "tgi_batch_current_size": "gauge",
    "tgi_batch_current_max_tokens": "gauge",
    "tgi_batch_max_total_tokens": "gauge",
    "tgi_batch_next_size": "histogram",
    "tgi_batch_concat": "counter",
    "tgi_batch_inference_count": "counter",
    "tgi_batch_inference_success": "counter",
    "tgi_batch_inference_failure": "counter",
    "tgi_batch_inference_duration": "histogram",
    "tgi_batch_forward_duration": "histogram",
    "tgi_batch_decode_duration": "histogram",
    "tgi_batch_filter_duration": "histogram",
    "tgi_batch_concat_duration": "histogram",
    "tgserve_request_time_to_first_token_seconds": "histogram",
    "tgserve_request_inter_token_latency_seconds": "histogram",
    "tgserve_kv_blocks_used": "gauge",
    "tgserve_kv_blocks_capacity": "gauge",
    "tgserve_requests_cancelled": "counter",
    "tgserve_requests_rejected": "counter",
    "tgserve_prompt_tokens": "counter",
    "tgserve_shard_forward_duration_seconds": "histogram",
}
# promtool's lint objects to TGI's own counter names; any other finding fails the test.
TGI_NAMING_LINT = re.compile(
    r'(tgi_\w+) (counter metrics should have "_total" suffix'
    r'|non-histogram and non-summary metrics should not have "_count" suffix)'
)
SECRET_PROMPT = "Marmalade zebras quietly juggle"


# ---- an OTLP/gRPC collector on loopback ----------------------------------------------------


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, object]


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        received = []
        for resource_spans in request.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    attributes = {a.key: _any_value(a.value) for a in span.attributes}
                    received.append(ReceivedSpan(service, span.name, span.trace_id.hex(),
                                                 span.span_id.hex(), span.parent_span_id.hex(),
                                                 attributes))
        with self.lock:
            self.spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


def _any_value(value) -> object:  # type: ignore[no-untyped-def]
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Collector, int]]:
    servicer = Collector()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(grace=None)


@pytest.fixture(scope="module")
def server(collector: tuple[Collector, int]) -> Iterator[LaunchedServer]:
    _, port = collector
    launched = LaunchedServer([*SMALL_LIMITS, "--json-output",
                               "--otlp-endpoint", f"http://127.0.0.1:{port}"]).start()
    yield launched
    launched.stop()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.2)


# ---- metrics -------------------------------------------------------------------------------


def scrape(url: str) -> tuple[str, dict[str, float], dict[str, str]]:
    """(text, {sample name + sorted labels: value}, {family: type})."""
    text = httpx.get(url, timeout=30).text
    values: dict[str, float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            values[_key(s.name, **s.labels)] = s.value
    return text, values, types


def _key(name: str, **labels: str) -> str:
    return name + "".join(f"|{k}={v}" for k, v in sorted(labels.items()))


def prometheus_port(server: LaunchedServer) -> int:
    assert server.process is not None
    argv = list(server.process.args)  # type: ignore[arg-type]
    return int(argv[len(argv) - 1 - argv[::-1].index("--prometheus-port") + 1])


def stream(url: str, body: dict, keep: int | None = None) -> list[dict]:
    """Read the events of /generate_stream; with `keep`, hang up after that many."""
    events = []
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if keep is not None and len(events) >= keep:
                    break
    return events


def run_request_mix(url: str) -> None:
    """2 successes (3 + 4 tokens), 2 validation failures, 1 client that leaves mid-stream."""
    ok = httpx.post(f"{url}/generate", timeout=120, json={
        "inputs": "The capital of France is",
        "parameters": {"max_new_tokens": 3, "ignore_eos": True}})
    assert ok.status_code == 200, ok.text
    events = stream(url, {"inputs": "Hello",
                          "parameters": {"max_new_tokens": 4, "ignore_eos": True}})
    assert len(events) == 4
    bad = httpx.post(f"{url}/generate", json={"inputs": "Hi", "parameters": {"temperature": -1}})
    assert bad.status_code == 422
    bad_stream = stream(url, {"inputs": "Hi", "parameters": {"top_k": -5}})
    assert bad_stream[0]["error_type"] == "validation"
    left = stream(url, {"inputs": "Count: 1, 2, 3,",
                        "parameters": {"max_new_tokens": 500, "ignore_eos": True}}, keep=3)
    assert len(left) == 3


def test_metrics_move_by_the_right_amounts(server: LaunchedServer) -> None:
    url = f"{server.url}/metrics"
    _, before, _ = scrape(url)
    run_request_mix(server.url)

    def delta(name: str, **labels: str) -> float:
        return scrape(url)[1].get(_key(name, **labels), 0.0) - before.get(_key(name, **labels), 0.0)

    wait_for(lambda: delta("tgi_request_failure_total", err="dropped") >= 1, "the dropped request")
    wait_for(lambda: scrape(url)[1][_key("tgserve_kv_blocks_used")] == 0, "blocks to be freed")
    text, after, types = scrape(url)

    def moved(name: str, **labels: str) -> float:
        return after.get(_key(name, **labels), 0.0) - before.get(_key(name, **labels), 0.0)

    missing = {n: t for n, t in METRIC_TYPES.items() if types.get(n) != t}
    assert not missing, f"absent or mistyped: {missing}"
    # TGI's exact exposition names: bare counters, no _created series.
    assert re.search(r"^tgi_request_count \d", text, re.M)
    assert "_created" not in text
    expected = {
        ("tgi_request_count_total", ()): 5,
        ("tgi_request_success_total", ()): 2,
        ("tgi_request_failure_total", (("err", "validation"),)): 2,
        ("tgi_request_failure_total", (("err", "dropped"),)): 1,
        ("tgi_request_failure_total", (("err", "generation"),)): 0,
        ("tgi_request_failure_total", (("err", "overloaded"),)): 0,
        ("tgserve_requests_rejected_total", (("reason", "validation"),)): 2,
        ("tgserve_requests_cancelled_total", (("reason", "client_disconnected"),)): 1,
        ("tgi_request_duration_count", ()): 2,
        ("tgi_request_queue_duration_count", ()): 2,
        ("tgi_request_inference_duration_count", ()): 2,
        ("tgi_request_mean_time_per_token_duration_count", ()): 2,
        ("tgi_request_generated_tokens_count", ()): 2,
        ("tgi_request_generated_tokens_sum", ()): 3 + 4,
        ("tgi_request_validation_duration_count", ()): 3,  # the two failures never validated
        ("tgi_request_input_length_count", ()): 3,
        ("tgi_request_max_new_tokens_count", ()): 3,
        ("tgi_request_max_new_tokens_sum", ()): 3 + 4 + 500,
        ("tgserve_request_time_to_first_token_seconds_count", ()): 3,
    }
    got = {key: moved(key[0], **dict(key[1])) for key in expected}
    assert got == expected
    # 2 + 3 gaps in the successes, at least 2 in the stream the client left.
    assert moved("tgserve_request_inter_token_latency_seconds_count") >= 7
    assert moved("tgi_batch_inference_success_total", method="prefill") >= 3
    assert moved("tgi_batch_forward_duration_count", method="decode") >= 5
    assert moved("tgserve_shard_forward_duration_seconds_count", method="decode", shard="0") >= 5


def promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("promtool is missing: `make install` installs Debian's `prometheus` package "
                    "(apt-get install -y --no-install-recommends prometheus)")
    pytest.skip("promtool not on PATH (Debian package `prometheus`); under CI=true this fails")


@pytest.mark.parametrize("where", ["/metrics", "--prometheus-port"])
def test_promtool_accepts_the_exposition(server: LaunchedServer, where: str) -> None:
    tool = promtool()
    if where == "/metrics":
        url = f"{server.url}/metrics"
    else:
        url = f"http://127.0.0.1:{prometheus_port(server)}/metrics"
    text = httpx.get(url, timeout=30).text
    assert "# TYPE tgi_request_count counter" in text
    done = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True,
                          timeout=60)
    findings = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode in (0, 3), findings  # 1: the text did not parse
    others = [f for f in findings if not TGI_NAMING_LINT.fullmatch(f.strip())]
    assert not others, f"promtool found problems beyond TGI's naming: {others}"
    flagged = {m.group(1) for f in findings if (m := TGI_NAMING_LINT.fullmatch(f.strip()))}
    assert flagged <= {n for n, t in METRIC_TYPES.items() if t == "counter"}


# ---- request ids and logs ------------------------------------------------------------------


def json_lines(server: LaunchedServer) -> list[dict]:
    out = []
    for line in server.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def test_request_id_in_headers_and_log_lines(server: LaunchedServer) -> None:
    mine = f"obs-{secrets.token_hex(4)}"
    r = httpx.post(f"{server.url}/generate", headers={"X-Request-Id": mine}, timeout=120,
                   json={"inputs": SECRET_PROMPT, "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200 and r.headers["x-request-id"] == mine
    made = httpx.get(f"{server.url}/health").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    refused = httpx.post(f"{server.url}/generate",
                         json={"inputs": "x", "parameters": {"top_k": -1}})
    assert refused.status_code == 422 and refused.headers["x-request-id"]

    def summary() -> list[dict]:
        return [e for e in json_lines(server)
                if e.get("request_id") == mine and e.get("target") == "tgserve.router.requests"]

    wait_for(lambda: bool(summary()), "the request's log line", timeout=30)
    (line,) = summary()
    fields = line["fields"]
    assert line["component"] == "router" and fields["outcome"] == "ok"
    assert fields["generated_tokens"] == 2 and fields["input_tokens"] > 0
    assert {"total_ms", "validation_ms", "queue_ms", "inference_ms"} <= fields.keys()
    # Without --log-prompts neither the prompt nor the output is ever written.
    log_text = server.log_path.read_text(errors="replace")
    assert SECRET_PROMPT not in log_text
    assert "inputs" not in fields and "generated_text" not in fields


# ---- traces --------------------------------------------------------------------------------


def test_traceparent_continues_into_router_and_shard_spans(
    server: LaunchedServer, collector: tuple[Collector, int]
) -> None:
    received, _ = collector
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    r = httpx.post(f"{server.url}/generate", timeout=120,
                   headers={"traceparent": f"00-{trace_id}-{client_span}-01"},
                   json={"inputs": "Tell me a story", "parameters": {"max_new_tokens": 3,
                                                                      "ignore_eos": True}})
    assert r.status_code == 200

    def all_there() -> bool:
        # Spans reach the collector in export batches, so the second Decode may come later than
        # the first: wait for both, not for each name once.
        names = [s.name for s in received.of_trace(trace_id)]
        return {"POST /generate", "prefill", "decode", "Prefill"} <= set(names) \
            and names.count("Decode") >= 2

    wait_for(all_there, "the router's and the shard's spans")
    spans = received.of_trace(trace_id)
    by_name: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    (root,) = by_name["POST /generate"]
    assert root.parent_id == client_span
    assert root.service == "text-generation-inference.router"
    assert root.attributes["tgserve.request_id"] == r.headers["x-request-id"]
    assert root.attributes["tgserve.generated_tokens"] == 3
    for phase in ("validation", "queue", "prefill", "decode"):
        (span,) = by_name[phase]
        assert span.parent_id == root.span_id and span.service == root.service
    (shard_prefill,) = by_name["Prefill"]
    assert shard_prefill.parent_id == by_name["prefill"][0].span_id
    assert shard_prefill.service == "text-generation-inference.server"
    # 3 tokens: the prefill makes the first, two decode steps the rest.
    assert len(by_name["Decode"]) == 2
    assert all(s.parent_id == by_name["decode"][0].span_id for s in by_name["Decode"])
