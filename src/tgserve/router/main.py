"""Router process entry: connect to the shards, warm up, resolve limits, serve HTTP, drain."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from tgserve.config import WARMUP_BATCH_TOTAL_TOKENS, WARMUP_PREFILL_TOKENS, Config
from tgserve.env import child_config
from tgserve.memory import release_free_memory
from tgserve.router.app import create_app
from tgserve.router.chat import load_chat_template
from tgserve.router.core.scheduler import Scheduler, SchedulerSettings
from tgserve.router.core.warmup import StartupError, connect_and_warmup, resolve_settings
from tgserve.router.infer import Infer
from tgserve.router.lifecycle import Lifecycle
from tgserve.router.metrics import Metrics, MetricsObserver, start_metrics_server
from tgserve.router.observe import Telemetry
from tgserve.router.request_id import RequestIdFilter
from tgserve.router.settings import RouterSettings
from tgserve.router.shard_client import CoreShardClient
from tgserve.router.tokenization import RouterTokenizer
from tgserve.router.tokenization import load as load_tokenizer
from tgserve.router.tracing import TracedShardClient
from tgserve.router.types import ShardInfo
from tgserve.tracing import Tracing, setup_tracing

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
    """What fits, where each value came from, and which flag changes it: printed once at start.

    `flag`: set on the command line; `warmup`: what the shards' memory allows; `default`: the
    flag's default."""
    kv_given = config.max_batch_total_tokens is not None or config.kv_cache_memory is not None
    rows = [
        ("max_input_tokens", settings.max_input_tokens,
         _origin(config.max_input_tokens is not None, "warmup"), "--max-input-tokens"),
        ("max_total_tokens", settings.max_total_tokens,
         _origin(config.max_total_tokens is not None, "warmup"), "--max-total-tokens"),
        ("max_batch_prefill_tokens", settings.max_batch_prefill_tokens,
         _origin(config.max_batch_prefill_tokens is not None, "default"),
         "--max-batch-prefill-tokens"),
        ("max_batch_total_tokens (KV)", settings.max_batch_total_tokens,
         _origin(kv_given, "warmup"), "--kv-cache-memory"),
        ("max_batch_size", settings.max_batch_size or "unlimited",
         _origin(config.max_batch_size is not None, "default"), "--max-batch-size"),
        ("max_concurrent_requests", config.max_concurrent_requests,
         _origin(config.max_concurrent_requests != _default("max_concurrent_requests"),
                 "default"), "--max-concurrent-requests"),
        ("request_timeout (s)", config.request_timeout or "none",
         _origin(config.request_timeout is not None, "default"), "--request-timeout"),
    ]
    lines = [f"{'limit':<30}{'value':>12}  {'from':<8}  change with"]
    for name, value, origin, flag in rows:
        lines.append(f"{name:<30}{value!s:>12}  {origin:<8}  {flag}")
    return "\n".join(lines)


def _origin(given: bool, otherwise: str) -> str:
    return "flag" if given else otherwise


def _default(name: str) -> object:
    return next(f.default for f in dataclasses.fields(Config) if f.name == name)


def model_info(config: Config, info: ShardInfo) -> dict:
    return {
        "model_id": config.model_name,
        "model_dtype": info.dtype,
        "model_device_type": info.device_type,
        "max_batch_total_tokens": None,
    }


@dataclass
class Engine:
    """What serving needs after warmup, and what stopping closes."""

    app: ASGIApp
    scheduler: Scheduler
    client: CoreShardClient
    tokenizer: RouterTokenizer
    tracing: Tracing | None

    async def close(self) -> None:
        await self.scheduler.stop()
        await self.client.close()
        self.tokenizer.close()
        if self.tracing is not None:
            self.tracing.shutdown()


async def start_engine(config: Config, lifecycle: Lifecycle) -> Engine:
    """Connect, warm up, resolve the limits, load the tokenizer: each step logged as it begins."""
    began = time.monotonic()
    lifecycle.step = "connecting to the shards"
    log.info("warmup: %s", lifecycle.step)
    client = await CoreShardClient.connect(config.shard_socket(0))
    requested = scheduler_settings(config)
    lifecycle.step = (f"warming up: one prefill of {requested.max_batch_prefill_tokens} tokens "
                      "and a decode step, to size the KV cache")
    log.info("warmup: %s", lifecycle.step)
    try:
        info, *limits = await connect_and_warmup(client, requested)
        settings = resolve_settings(requested, info, tuple(limits))  # type: ignore[arg-type]
    except BaseException:
        await client.close()
        raise
    log.info("warmup: the shards are warm after %.1fs; limits:\n%s",
             time.monotonic() - began, limits_table(config, settings))
    lifecycle.step = "loading the tokenizer"
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
    return Engine(app, scheduler, client, tokenizer, tracing)


async def serve(config: Config) -> int:
    # The port opens first: while the shards warm up, probes get a 503 that says so.
    lifecycle = Lifecycle()
    server = uvicorn.Server(uvicorn.Config(lifecycle, host=config.hostname, port=config.port,
                                           log_level="warning", lifespan="off"))
    # The router drains on SIGTERM itself (below): uvicorn must not take the signals first, or
    # it would close the listening socket at once.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign, assignment]
    http = asyncio.create_task(server.serve(), name="http")
    startup = asyncio.create_task(start_engine(config, lifecycle), name="startup")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(_drain_then_exit(
            lifecycle, server, config.graceful_termination_timeout, startup)))
    try:
        engine = await startup
    except asyncio.CancelledError:  # stopped during warmup
        await http
        return 0
    except StartupError as e:
        log.error("%s", e)
        server.should_exit = True
        await http
        return 1
    lifecycle.serve(engine.app)
    _start_prometheus(config.prometheus_port, config.hostname)
    log.info("serving %s on http://%s:%d", config.model_name, config.hostname, config.port)
    try:
        await http
    finally:
        await engine.close()
    return 0


async def _drain_then_exit(lifecycle: Lifecycle, server: uvicorn.Server, timeout: float,
                           startup: asyncio.Task) -> None:
    """Answer 503 to new requests, let the ones in flight finish up to `timeout`, then stop."""
    if lifecycle.draining:
        return
    lifecycle.drain()
    startup.cancel()  # a no-op once warm
    log.info("draining %d in-flight request(s) (up to %ss)", lifecycle.in_flight, timeout)
    deadline = time.monotonic() + timeout
    while lifecycle.in_flight and time.monotonic() < deadline:
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
