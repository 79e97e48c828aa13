"""Router process entry: connect to the shards, warm up, resolve limits, serve HTTP, drain."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from pathlib import Path

import uvicorn

from tgserve.config import WARMUP_BATCH_TOTAL_TOKENS, WARMUP_PREFILL_TOKENS, Config
from tgserve.env import child_config
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


def scheduler_settings(config: Config) -> SchedulerSettings:
    """What the router asks warmup for; unset limits are resolved from its answer."""
    return SchedulerSettings(
        max_batch_prefill_tokens=config.max_batch_prefill_tokens or WARMUP_PREFILL_TOKENS,
        max_batch_total_tokens=config.max_batch_total_tokens or WARMUP_BATCH_TOTAL_TOKENS,
        waiting_served_ratio=config.waiting_served_ratio,
        max_waiting_tokens=config.max_waiting_tokens,
        max_batch_size=config.max_batch_size,
        max_step_prefill_tokens=config.max_step_prefill_tokens,
        max_input_tokens=config.max_input_tokens,
        max_total_tokens=config.max_total_tokens,
    )


def limits_table(config: Config, settings: SchedulerSettings) -> str:
    """What fits, and which flag changes it: printed once at start."""
    rows = [
        ("max_input_tokens", settings.max_input_tokens, config.max_input_tokens,
         "--max-input-tokens"),
        ("max_total_tokens", settings.max_total_tokens, config.max_total_tokens,
         "--max-total-tokens"),
        ("max_batch_prefill_tokens", settings.max_batch_prefill_tokens,
         config.max_batch_prefill_tokens, "--max-batch-prefill-tokens"),
        ("max_batch_total_tokens (KV)", settings.max_batch_total_tokens,
         config.max_batch_total_tokens, "--kv-cache-memory"),
        ("max_batch_size", settings.max_batch_size or "unlimited", config.max_batch_size,
         "--max-batch-size"),
        ("max_concurrent_requests", config.max_concurrent_requests,
         config.max_concurrent_requests, "--max-concurrent-requests"),
    ]
    lines = [f"{'limit':<30}{'value':>12}  {'from':<8}  change with"]
    for name, value, given, flag in rows:
        origin = "flag" if given is not None and name != "max_concurrent_requests" else "derived"
        lines.append(f"{name:<30}{value!s:>12}  {origin:<8}  {flag}")
    return "\n".join(lines)


def model_info(config: Config, info: ShardInfo) -> dict:
    return {
        "model_id": config.model_name,
        "model_dtype": info.dtype,
        "model_device_type": info.device_type,
        "max_batch_total_tokens": None,
    }


async def serve(config: Config) -> int:
    client = await CoreShardClient.connect(config.shard_socket(0))
    requested = scheduler_settings(config)
    try:
        info, *limits = await connect_and_warmup(client, requested)
        settings = resolve_settings(requested, info, tuple(limits))  # type: ignore[arg-type]
    except StartupError as e:
        log.error("%s", e)
        return 1
    log.info("limits after warmup:\n%s", limits_table(config, settings))
    assert config.model_path is not None, "the launcher resolves the model before the router"
    tokenizer = load_tokenizer(config.model_path, config.validation_workers)
    release_free_memory()  # what parsing tokenizer.json freed
    assert settings.max_input_tokens is not None and settings.max_total_tokens is not None
    router_settings = RouterSettings(
        hostname=config.hostname, port=config.port, api_key=config.api_key,
        cors_allow_origin=config.cors_allow_origin, payload_limit=config.payload_limit,
        max_concurrent_requests=config.max_concurrent_requests,
        max_best_of=config.max_best_of, max_stop_sequences=config.max_stop_sequences,
        max_top_n_tokens=config.max_top_n_tokens, max_input_tokens=settings.max_input_tokens,
        max_total_tokens=settings.max_total_tokens,
        max_client_batch_size=config.max_client_batch_size,
        validation_workers=config.validation_workers, model_id=config.model_name,
        compute_type=f"{info.device_type}+tgserve",
        grammar_support=not config.disable_grammar_support,
        request_timeout=config.request_timeout,
        cache_salt_from_api_key=config.cache_salt_from_api_key,
    )
    metrics = Metrics.create(settings.max_input_tokens, settings.max_total_tokens)
    metrics.batch_max_total_tokens.set(settings.max_batch_total_tokens)
    metrics.kv_blocks_total.set(settings.max_batch_total_tokens // settings.block_size)
    tracing = setup_tracing(config.otlp_endpoint, config.otlp_service_name)
    telemetry = Telemetry(metrics, tracing.tracer if tracing else None, config.log_prompts)
    backend = TracedShardClient(client, telemetry.traces) if tracing else client
    scheduler = Scheduler(backend, settings, observer=MetricsObserver(metrics),
                          mixed_prefill=info.mixed_prefill, prefix_caching=info.prefix_caching)
    if isinstance(backend, TracedShardClient):
        backend.lookup = scheduler.request_in_flight
    scheduler.start()
    infer = Infer(scheduler, tokenizer, router_settings.limits(), config.max_concurrent_requests,
                  telemetry=telemetry)
    extra = model_info(config, info)
    extra["max_batch_total_tokens"] = settings.max_batch_total_tokens
    chat_template = load_chat_template(
        config.model_path, tokenizer.tokenizer, config.tokenizer_config_path
    )
    if chat_template is None:
        log.warning("the model has no chat template: /v1/chat/completions will answer 400")
    app = create_app(infer, extra, router_settings, chat_template)
    drain = DrainMiddleware(app)
    _start_prometheus(config.prometheus_port, config.hostname)
    server = uvicorn.Server(uvicorn.Config(drain, host=config.hostname, port=config.port,
                                           log_level="warning", lifespan="off"))
    # The router drains on SIGTERM itself (below): uvicorn must not take the signals first.
    server.install_signal_handlers = lambda: None  # type: ignore[attr-defined]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(
            _drain_then_exit(drain, server, config.graceful_termination_timeout)))
    log.info("serving %s on http://%s:%d", config.model_name, config.hostname, config.port)
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
    """`tgserve router`: no flags of its own; the launcher's Config comes in the environment."""
    if argv:
        raise SystemExit(f"tgserve router takes no arguments (got {argv}); start `tgserve`")
    config = child_config()
    from tgserve.logs import setup_logging

    setup_logging(json_output=config.json_output, component="router",
                  filters=[RequestIdFilter()])
    if config.tokenizer_config_path:
        # Fail early on a bad file (a .jinja template is read as it is).
        if not config.tokenizer_config_path.endswith(".jinja"):
            json.loads(Path(config.tokenizer_config_path).read_text())
    return asyncio.run(serve(config))
