"""Every Prometheus metric of the router, declared once with TGI's names, and their exposition."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric

from tgserve.router.core.batch import ShardTimings

# Label values known in advance, exported at zero from the start so dashboards and rate() see them.
FAILURE_KINDS = ("validation", "overloaded", "generation", "incomplete", "dropped", "template",
                 "deadline", "deadline_expired")
# deadline: refused at once, its first token would have come too late (core/admission.py).
REJECT_REASONS = ("validation", "overloaded", "deadline")
# deadline_expired: left the queue when its deadline passed, before it reached the shards.
CANCEL_REASONS = ("client_disconnected", "deadline_expired")
STEP_METHODS = ("prefill", "decode")
CONCAT_REASONS = ("backpressure", "wait_exceeded")


def duration_buckets() -> list[float]:
    """TGI's: 35 geometric buckets from 150 µs, ×1.5 each."""
    return [0.00015 * 1.5**i for i in range(35)]


def linear_buckets(top: int, count: int = 100) -> list[float]:
    step = max(top / count, 1.0)
    return [step * (i + 1) for i in range(count)]


@dataclass
class Metrics:
    registry: CollectorRegistry
    request_count: Counter
    request_success: Counter
    request_failure: Counter
    request_duration: Histogram
    request_validation_duration: Histogram
    request_queue_duration: Histogram
    request_inference_duration: Histogram
    request_mean_time_per_token_duration: Histogram
    request_generated_tokens: Histogram
    request_input_length: Histogram
    request_max_new_tokens: Histogram
    request_skipped_tokens: Histogram
    queue_size: Gauge
    batch_current_size: Gauge
    batch_current_max_tokens: Gauge
    batch_max_total_tokens: Gauge
    batch_next_size: Histogram
    batch_concat: Counter
    batch_inference_count: Counter
    batch_inference_success: Counter
    batch_inference_failure: Counter
    batch_inference_duration: Histogram
    batch_forward_duration: Histogram
    batch_decode_duration: Histogram
    batch_filter_duration: Histogram
    batch_concat_duration: Histogram
    # Beyond TGI.
    time_to_first_token: Histogram
    inter_token_latency: Histogram
    kv_blocks_used: Gauge
    kv_blocks_total: Gauge
    requests_cancelled: Counter
    requests_rejected: Counter
    prompt_tokens: Counter
    shard_forward_duration: Histogram

    @classmethod
    def create(
        cls, max_input_tokens: int, max_total_tokens: int, registry: CollectorRegistry = REGISTRY
    ) -> Metrics:
        d = duration_buckets()
        r = registry

        def hist(
            name: str, doc: str, buckets: list[float], labels: tuple[str, ...] = ()
        ) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        metrics = cls(
            registry=r,
            request_count=Counter("tgi_request_count", "Requests received", registry=r),
            request_success=Counter("tgi_request_success", "Requests that succeeded", registry=r),
            request_failure=Counter("tgi_request_failure", "Requests that failed", ["err"],
                                    registry=r),
            request_duration=hist("tgi_request_duration", "End-to-end request seconds", d),
            request_validation_duration=hist("tgi_request_validation_duration",
                                             "Validation seconds", d),
            request_queue_duration=hist("tgi_request_queue_duration", "Seconds in the queue", d),
            request_inference_duration=hist("tgi_request_inference_duration",
                                            "Seconds from batching to the end", d),
            request_mean_time_per_token_duration=hist(
                "tgi_request_mean_time_per_token_duration", "Inference seconds per token", d),
            request_generated_tokens=hist("tgi_request_generated_tokens", "Generated tokens",
                                          linear_buckets(max_total_tokens)),
            request_input_length=hist("tgi_request_input_length", "Prompt tokens",
                                      linear_buckets(max_input_tokens)),
            request_max_new_tokens=hist("tgi_request_max_new_tokens", "Requested new tokens",
                                        linear_buckets(max_total_tokens)),
            request_skipped_tokens=hist("tgi_request_skipped_tokens",
                                        "Speculated tokens accepted per step",
                                        linear_buckets(10, 10)),
            queue_size=Gauge("tgi_queue_size", "Requests waiting", registry=r),
            batch_current_size=Gauge("tgi_batch_current_size", "Requests in the running batch",
                                     registry=r),
            batch_current_max_tokens=Gauge("tgi_batch_current_max_tokens",
                                           "KV tokens held by the running batch", registry=r),
            batch_max_total_tokens=Gauge("tgi_batch_max_total_tokens",
                                         "KV tokens the shards can hold", registry=r),
            batch_next_size=hist("tgi_batch_next_size", "Size of each new batch",
                                 [float(2**i) for i in range(11)]),
            batch_concat=Counter("tgi_batch_concat", "New requests joining a running batch",
                                 ["reason"], registry=r),
            batch_inference_count=Counter("tgi_batch_inference_count", "Shard steps", ["method"],
                                          registry=r),
            batch_inference_success=Counter("tgi_batch_inference_success",
                                            "Successful shard steps", ["method"], registry=r),
            batch_inference_failure=Counter("tgi_batch_inference_failure", "Failed shard steps",
                                            ["method"], registry=r),
            batch_inference_duration=hist("tgi_batch_inference_duration",
                                          "Shard step seconds seen by the router", d, ("method",)),
            batch_forward_duration=hist("tgi_batch_forward_duration", "Model forward seconds", d,
                                        ("method",)),
            batch_decode_duration=hist("tgi_batch_decode_duration",
                                       "Sampling and detokenization seconds", d, ("method",)),
            batch_filter_duration=hist("tgi_batch_filter_duration",
                                       "Seconds sending tokens and filtering", d, ("method",)),
            batch_concat_duration=hist("tgi_batch_concat_duration", "Shard concatenation seconds",
                                       d, ("method",)),
            time_to_first_token=hist("tgserve_request_time_to_first_token_seconds",
                                     "Seconds from arrival to the first token", d),
            inter_token_latency=hist("tgserve_request_inter_token_latency_seconds",
                                     "Seconds between streamed tokens", d),
            kv_blocks_used=Gauge("tgserve_kv_blocks_used", "KV cache blocks in use", registry=r),
            kv_blocks_total=Gauge("tgserve_kv_blocks_capacity", "KV cache blocks", registry=r),
            requests_cancelled=Counter("tgserve_requests_cancelled",
                                       "Requests whose client left", ["reason"], registry=r),
            requests_rejected=Counter("tgserve_requests_rejected",
                                      "Requests refused before queueing", ["reason"], registry=r),
            prompt_tokens=Counter("tgserve_prompt_tokens",
                                  "Prompt tokens admitted to a prefill, computed or taken from "
                                  "the prefix cache", ["source"], registry=r),
            shard_forward_duration=hist("tgserve_shard_forward_duration_seconds",
                                        "Model forward seconds of each shard", d,
                                        ("method", "shard")),
        )
        metrics._touch_labels()
        return metrics

    def _touch_labels(self) -> None:
        for err in FAILURE_KINDS:
            self.request_failure.labels(err=err)
        for reason in REJECT_REASONS:
            self.requests_rejected.labels(reason=reason)
        for reason in CONCAT_REASONS:
            self.batch_concat.labels(reason=reason)
        for reason in CANCEL_REASONS:
            self.requests_cancelled.labels(reason=reason)
        for source in ("computed", "cached"):
            self.prompt_tokens.labels(source=source)
        for method in STEP_METHODS:
            for counter in (self.batch_inference_count, self.batch_inference_success,
                            self.batch_inference_failure):
                counter.labels(method=method)


# ---- exposition: TGI's exact names --------------------------------------------------------

log = logging.getLogger(__name__)


class _Families:
    """A collector over families already collected (what generate_latest takes)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> list[Metric]:
        return self.families


def _tgi_counter(family: Metric) -> bytes:
    # prometheus_client would export `<name>_total`; TGI's exporter adds no suffix, and TGI's
    # dashboards query the bare name. Rendered as a gauge (same text), then retyped.
    bare = Metric(family.name, family.documentation, "gauge")
    bare.samples = [s._replace(name=family.name) if s.name == family.name + "_total" else s
                    for s in family.samples]
    text = generate_latest(_Families([bare])).decode("utf-8")
    return text.replace(f"# TYPE {family.name} gauge\n", f"# TYPE {family.name} counter\n",
                        1).encode("utf-8")


def exposition(registry: CollectorRegistry = REGISTRY) -> bytes:
    """Prometheus text format 0.0.4: `tgi_*` counters under TGI's bare names, no `_created`."""
    out = []
    for family in registry.collect():
        family.samples = [s for s in family.samples if not s.name.endswith("_created")]
        if family.type == "counter" and family.name.startswith("tgi_"):
            out.append(_tgi_counter(family))
        else:
            out.append(generate_latest(_Families([family])))
    return b"".join(out)


def start_metrics_server(
    port: int, host: str, registry: CollectorRegistry = REGISTRY
) -> ThreadingHTTPServer:
    """The --prometheus-port listener: the same text as /metrics, on any path."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            body = exposition(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # one line per scrape would drown the request log

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="prometheus", daemon=True).start()
    return server


class MetricsObserver:
    """The scheduler's observer: turns batching events into TGI's batch metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def on_queue_size(self, size: int) -> None:
        self.m.queue_size.set(size)

    def on_next_batch_size(self, size: int) -> None:
        self.m.batch_next_size.observe(size)

    def on_batch_size(self, size: int, max_tokens: int) -> None:
        self.m.batch_current_size.set(size)
        self.m.batch_current_max_tokens.set(max_tokens)

    def on_concat(self, reason: str) -> None:
        self.m.batch_concat.labels(reason=reason).inc()

    def _step(self, method: str, duration: float, timings: ShardTimings) -> None:
        self.m.batch_inference_count.labels(method=method).inc()
        self.m.batch_inference_success.labels(method=method).inc()
        self.m.batch_inference_duration.labels(method=method).observe(duration)
        self.m.batch_forward_duration.labels(method=method).observe(timings.forward_ns / 1e9)
        for shard, forward_ns in enumerate(timings.forward_ns_per_shard):
            self.m.shard_forward_duration.labels(method=method, shard=str(shard)).observe(
                forward_ns / 1e9
            )
        self.m.batch_decode_duration.labels(method=method).observe(timings.decode_ns / 1e9)
        if timings.concat_ns is not None:
            # TGI files every concat under method="decode".
            self.m.batch_concat_duration.labels(method="decode").observe(timings.concat_ns / 1e9)

    def on_prefill(self, duration: float, batch_size: int, timings: ShardTimings) -> None:
        self._step("prefill", duration, timings)

    def on_decode(self, duration: float, batch_size: int, timings: ShardTimings) -> None:
        self._step("decode", duration, timings)

    def on_inference_failure(self, method: str) -> None:
        self.m.batch_inference_count.labels(method=method).inc()
        self.m.batch_inference_failure.labels(method=method).inc()

    def on_filter(self, method: str, duration: float) -> None:
        self.m.batch_filter_duration.labels(method=method).observe(duration)

    def on_blocks(self, used: int, total: int) -> None:
        self.m.kv_blocks_used.set(used)
        self.m.kv_blocks_total.set(total)

    def on_prompt_tokens(self, computed: int, cached: int) -> None:
        self.m.prompt_tokens.labels(source="computed").inc(computed)
        self.m.prompt_tokens.labels(source="cached").inc(cached)

    def on_request_dropped(self) -> None:
        # Counted once per HTTP request by observe.RequestTracker, which also sees requests that
        # leave during validation; counting here too would count best_of siblings twice.
        pass
