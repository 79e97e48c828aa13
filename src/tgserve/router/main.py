"""Router process entry: connect to the shards, warm up, resolve limits, serve HTTP, drain on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import time
from pathlib import Path

import uvicorn

from tgserve.memory import release_free_memory
from tgserve.router.app import create_app
from tgserve.router.chat import load_chat_template
from tgserve.router.core.scheduler import Scheduler, SchedulerSettings
from tgserve.router.core.warmup import StartupError, connect_and_warmup, resolve_settings
from tgserve.router.draining import DrainMiddleware
from tgserve.router.infer import Infer
from tgserve.router.metrics import Metrics, MetricsObserver, start_metrics_server
from tgserve.router.observe import Telemetry
from tgserve.router.request_id import RequestIdFilter
from tgserve.router.settings import RouterSettings
from tgserve.router.shard_client import CoreShardClient
from tgserve.router.tokenization import load as load_tokenizer
from tgserve.router.tracing import TracedShardClient
from tgserve.router.types import ShardInfo
from tgserve.tracing import setup_tracing

log = logging.getLogger("tgserve.router")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tgserve router")
    p.add_argument("--master-shard-uds-path", required=True)
    p.add_argument("--tokenizer-name", required=True)
    p.add_argument("--model-id", required=True)
    p.add_argument("--max-concurrent-requests", type=int, default=128)
    p.add_argument("--max-best-of", type=int, default=2)
    p.add_argument("--max-stop-sequences", type=int, default=4)
    p.add_argument("--max-top-n-tokens", type=int, default=5)
    p.add_argument("--max-input-tokens", type=int)
    p.add_argument("--max-total-tokens", type=int)
    p.add_argument("--waiting-served-ratio", type=float, default=0.3)
    p.add_argument("--max-batch-prefill-tokens", type=int)
    p.add_argument("--max-batch-total-tokens", type=int)
    p.add_argument("--max-waiting-tokens", type=int, default=20)
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-step-prefill-tokens", type=int, default=256)
    p.add_argument("--hostname", default="0.0.0.0")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--prometheus-port", type=int, default=9000)
    p.add_argument("--validation-workers", type=int, default=2)
    p.add_argument("--api-key")
    p.add_argument("--payload-limit", type=int, default=2_000_000)
    p.add_argument("--max-client-batch-size", type=int, default=4)
    p.add_argument("--otlp-endpoint")
    p.add_argument("--otlp-service-name", default="text-generation-inference.router")
    p.add_argument("--graceful-termination-timeout", type=int, default=90)
    p.add_argument("--tokenizer-config-path")
    p.add_argument("--cors-allow-origin", action="append", default=[])
    p.add_argument("--json-output", action="store_true")
    p.add_argument("--log-prompts", action="store_true")
    p.add_argument("--disable-grammar-support", action="store_true")
    return p.parse_args(argv)


def scheduler_settings(args: argparse.Namespace) -> SchedulerSettings:
    return SchedulerSettings(
        max_batch_prefill_tokens=args.max_batch_prefill_tokens or 4096,
        max_batch_total_tokens=args.max_batch_total_tokens or 16000,
        waiting_served_ratio=args.waiting_served_ratio,
        max_waiting_tokens=args.max_waiting_tokens,
        max_batch_size=args.max_batch_size,
        max_step_prefill_tokens=args.max_step_prefill_tokens,
        max_input_tokens=args.max_input_tokens,
        max_total_tokens=args.max_total_tokens,
    )


def limits_table(args: argparse.Namespace, settings: SchedulerSettings) -> str:
    """What fits, and which flag changes it: printed once at start."""
    rows = [
        ("max_input_tokens", settings.max_input_tokens, args.max_input_tokens, "--max-input-tokens"),
        ("max_total_tokens", settings.max_total_tokens, args.max_total_tokens, "--max-total-tokens"),
        ("max_batch_prefill_tokens", settings.max_batch_prefill_tokens,
         args.max_batch_prefill_tokens, "--max-batch-prefill-tokens"),
        ("max_batch_total_tokens (KV)", settings.max_batch_total_tokens,
         args.max_batch_total_tokens, "--kv-cache-memory"),
        ("max_batch_size", settings.max_batch_size or "unlimited", args.max_batch_size,
         "--max-batch-size"),
        ("max_concurrent_requests", args.max_concurrent_requests, args.max_concurrent_requests,
         "--max-concurrent-requests"),
    ]
    lines = [f"{'limit':<30}{'value':>12}  {'from':<8}  change with"]
    for name, value, given, flag in rows:
        origin = "flag" if given is not None and name != "max_concurrent_requests" else "derived"
        lines.append(f"{name:<30}{value!s:>12}  {origin:<8}  {flag}")
    return "\n".join(lines)


def model_info(args: argparse.Namespace, info: ShardInfo) -> dict:
    return {
        "model_id": args.model_id,
        "model_dtype": info.dtype,
        "model_device_type": info.device_type,
        "max_batch_total_tokens": None,
    }


async def serve(args: argparse.Namespace) -> int:
    client = await CoreShardClient.connect(args.master_shard_uds_path)
    requested = scheduler_settings(args)
    try:
        info, *limits = await connect_and_warmup(client, requested)
        settings = resolve_settings(requested, info, tuple(limits))  # type: ignore[arg-type]
    except StartupError as e:
        log.error("%s", e)
        return 1
    log.info("limits after warmup:\n%s", limits_table(args, settings))
    tokenizer = load_tokenizer(args.tokenizer_name, args.validation_workers)
    release_free_memory()  # what parsing tokenizer.json freed: ~30 MB for a 49k-token vocabulary
    assert settings.max_input_tokens is not None and settings.max_total_tokens is not None
    router_settings = RouterSettings(
        hostname=args.hostname, port=args.port, api_key=args.api_key,
        cors_allow_origin=tuple(args.cors_allow_origin), payload_limit=args.payload_limit,
        max_concurrent_requests=args.max_concurrent_requests, max_best_of=args.max_best_of,
        max_stop_sequences=args.max_stop_sequences, max_top_n_tokens=args.max_top_n_tokens,
        max_input_tokens=settings.max_input_tokens, max_total_tokens=settings.max_total_tokens,
        max_client_batch_size=args.max_client_batch_size,
        validation_workers=args.validation_workers, model_id=args.model_id,
        compute_type=f"{info.device_type}+tgserve",
    )
    metrics = Metrics.create(settings.max_input_tokens, settings.max_total_tokens)
    metrics.batch_max_total_tokens.set(settings.max_batch_total_tokens)
    metrics.kv_blocks_total.set(settings.max_batch_total_tokens // settings.block_size)
    tracing = setup_tracing(args.otlp_endpoint, args.otlp_service_name)
    telemetry = Telemetry(metrics, tracing.tracer if tracing else None, args.log_prompts)
    backend = TracedShardClient(client, telemetry.traces) if tracing else client
    scheduler = Scheduler(backend, settings, observer=MetricsObserver(metrics),
                          mixed_prefill=info.mixed_prefill, prefix_caching=info.prefix_caching)
    if isinstance(backend, TracedShardClient):
        backend.lookup = scheduler.request_in_flight
    scheduler.start()
    infer = Infer(scheduler, tokenizer, router_settings.limits(), args.max_concurrent_requests,
                  telemetry=telemetry)
    extra = model_info(args, info)
    extra["max_batch_total_tokens"] = settings.max_batch_total_tokens
    chat_template = load_chat_template(
        args.tokenizer_name, tokenizer.tokenizer, args.tokenizer_config_path
    )
    if chat_template is None:
        log.warning("the model has no chat template: /v1/chat/completions will answer 400")
    app = create_app(infer, extra, router_settings, chat_template)
    drain = DrainMiddleware(app)
    _start_prometheus(args.prometheus_port, args.hostname)
    server = uvicorn.Server(uvicorn.Config(drain, host=args.hostname, port=args.port,
                                           log_level="warning", lifespan="off"))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(
            _drain_then_exit(drain, server, args.graceful_termination_timeout)))
    log.info("serving %s on http://%s:%d", args.model_id, args.hostname, args.port)
    try:
        await server.serve()
    finally:
        await scheduler.stop()
        await client.close()
        tokenizer.close()
        if tracing is not None:
            tracing.shutdown()
    return 0


async def _drain_then_exit(drain: DrainMiddleware, server: uvicorn.Server, timeout: float) -> None:
    """Refuse new requests (503), let the ones in flight finish up to `timeout`, then stop."""
    if drain.draining:
        return
    drain.draining = True
    log.info("draining %d in-flight request(s) (up to %ss)", drain.in_flight, timeout)
    deadline = time.monotonic() + timeout
    while drain.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    server.should_exit = True


def _start_prometheus(port: int, host: str) -> None:
    if port <= 0:
        return
    try:
        start_metrics_server(port, host)
    except OSError as e:  # a busy metrics port must not take the API down
        log.warning("cannot listen for Prometheus on port %d: %s (/metrics still works)", port, e)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tgserve.logs import setup_logging

    setup_logging(json_output=args.json_output, component="router", filters=[RequestIdFilter()])
    if args.tokenizer_config_path:
        # Fail early on a bad file (a .jinja template is read as it is).
        if not args.tokenizer_config_path.endswith(".jinja"):
            json.loads(Path(args.tokenizer_config_path).read_text())
    return asyncio.run(serve(args))
