"""Closed-loop load at each concurrency level, alternating between servers in one invocation."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import httpx

from tgserve.benchmark.client import (
    Endpoint,
    GenerationSettings,
    discover_model,
    make_client,
    send_request,
)
from tgserve.benchmark.prompts import WARMUP_LEVEL, Prompt, level_prompts
from tgserve.benchmark.rss import RssSampler, idle_cpu_percent
from tgserve.benchmark.stats import LevelStats, RequestRecord, aggregate


class BenchmarkError(RuntimeError):
    """The benchmark cannot go on (a server answers no request at all)."""


@dataclass(frozen=True)
class ServerSpec:
    """A server under test and, when it runs on this machine, the PID whose tree is measured."""

    endpoint: Endpoint
    pid: int | None = None


@dataclass(frozen=True)
class BenchmarkConfig:
    """Everything one invocation measures."""

    servers: tuple[ServerSpec, ...]
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    num_prompts: int = 64
    # Per level and server: one count for every level, or one per level (in `concurrency`'s
    # order) so low levels stay cheap; defaults to num_prompts.
    num_requests: int | tuple[int, ...] | None = None
    warmup_requests: int = 2
    seed: int = 0
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    timeout_s: float = 600.0
    rss_interval_s: float = 0.1
    # After warmup, how long to watch each local server idle and report the CPU it burns.
    idle_cpu_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.servers:
            raise ValueError("at least one server is needed")
        names = [spec.endpoint.name for spec in self.servers]
        if len(set(names)) != len(names):
            raise ValueError(f"server names must differ, got {names}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if isinstance(self.num_requests, tuple) and len(self.num_requests) != len(self.concurrency):
            raise ValueError(
                f"{len(self.num_requests)} request counts for {len(self.concurrency)} "
                "concurrency levels: give one count, or one per level"
            )
        counts = [self.requests_for(level) for level in self.concurrency]
        if min(counts) < 1 or self.warmup_requests < 0:
            raise ValueError("num_requests must be >= 1 and warmup_requests >= 0")

    def requests_for(self, concurrency: int) -> int:
        """Requests sent at this level (to each server)."""
        if self.num_requests is None:
            return self.num_prompts
        if isinstance(self.num_requests, int):
            return self.num_requests
        return self.num_requests[self.concurrency.index(concurrency)]

    @property
    def requests_per_level(self) -> list[int]:
        """The request count of each level, in `concurrency`'s order."""
        return [self.requests_for(level) for level in self.concurrency]


@dataclass(frozen=True)
class LevelResult:
    """One server at one concurrency level."""

    server: str
    stats: LevelStats
    peak_rss_bytes: int | None = None
    peak_hwm_bytes: int | None = None


@dataclass
class ServerResult:
    """All levels measured against one server."""

    spec: ServerSpec
    levels: list[LevelResult] = field(default_factory=list)
    idle_cpu_percent: float | None = None  # of one core, measured after warmup

    @property
    def name(self) -> str:
        return self.spec.endpoint.name

    @property
    def peak_rss_bytes(self) -> int | None:
        peaks = [lv.peak_rss_bytes for lv in self.levels if lv.peak_rss_bytes is not None]
        return max(peaks) if peaks else None

    def level(self, concurrency: int) -> LevelResult | None:
        return next((lv for lv in self.levels if lv.stats.concurrency == concurrency), None)


TransportFactory = Callable[[Endpoint], httpx.AsyncBaseTransport | None]
LevelCallback = Callable[[LevelResult], None]


async def run_closed_loop(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    prompts: Sequence[Prompt],
    concurrency: int,
    num_requests: int,
    settings: GenerationSettings,
) -> list[RequestRecord]:
    """`concurrency` workers, each sending the next prompt as soon as its last request ends."""
    # One event loop runs the workers, so taking the next index needs no lock.
    indices = itertools.count()
    records: list[RequestRecord] = []

    async def worker() -> None:
        while (index := next(indices)) < num_requests:
            prompt = prompts[index % len(prompts)]
            records.append(await send_request(client, endpoint, prompt, settings))

    await asyncio.gather(*(worker() for _ in range(min(concurrency, num_requests))))
    return records


def level_order(
    servers: Sequence[ServerSpec], levels: Sequence[int]
) -> Iterator[tuple[int, ServerSpec]]:
    """Each level runs on every server; the server order flips each level to cancel drift."""
    for position, concurrency in enumerate(levels):
        ordered = servers if position % 2 == 0 else list(reversed(servers))
        for spec in ordered:
            yield concurrency, spec


async def run_benchmark(
    config: BenchmarkConfig,
    transport_factory: TransportFactory | None = None,
    on_level: LevelCallback | None = None,
) -> list[ServerResult]:
    """Warm every server up, then run the sweep; results come back in the configured order."""
    warmup_prompts = level_prompts(config.num_prompts, config.seed, WARMUP_LEVEL)
    max_connections = max(max(config.concurrency), config.warmup_requests, 1)
    async with contextlib.AsyncExitStack() as stack:
        clients: dict[str, httpx.AsyncClient] = {}
        results: dict[str, ServerResult] = {}
        specs = []
        for spec in config.servers:
            transport = transport_factory(spec.endpoint) if transport_factory else None
            client = make_client(spec.endpoint.url, config.timeout_s, max_connections, transport)
            clients[spec.endpoint.name] = await stack.enter_async_context(client)
            spec = await _resolve_model(clients[spec.endpoint.name], spec)
            await _warm_up(clients[spec.endpoint.name], spec.endpoint, warmup_prompts, config)
            results[spec.endpoint.name] = ServerResult(spec=spec, idle_cpu_percent=None)
            if spec.pid and config.idle_cpu_s > 0:
                results[spec.endpoint.name].idle_cpu_percent = await asyncio.to_thread(
                    idle_cpu_percent, spec.pid, config.idle_cpu_s
                )
            specs.append(spec)
        for concurrency, spec in level_order(specs, config.concurrency):
            name = spec.endpoint.name
            prompts = level_prompts(config.num_prompts, config.seed, concurrency)
            level = await _run_level(clients[name], spec, prompts, concurrency, config)
            results[name].levels.append(level)
            if on_level is not None:
                on_level(level)
    for result in results.values():
        result.levels.sort(key=lambda lv: lv.stats.concurrency)
    return list(results.values())


async def _resolve_model(client: httpx.AsyncClient, spec: ServerSpec) -> ServerSpec:
    """Asks an OpenAI server for its model name when none was given."""
    endpoint = spec.endpoint
    if endpoint.api != "openai" or endpoint.model is not None:
        return spec
    model = await discover_model(client) or "default"
    return dataclasses.replace(spec, endpoint=dataclasses.replace(endpoint, model=model))


async def _warm_up(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    prompts: Sequence[Prompt],
    config: BenchmarkConfig,
) -> None:
    if config.warmup_requests == 0:
        return
    records = await run_closed_loop(
        client, endpoint, prompts, config.warmup_requests, config.warmup_requests, config.settings
    )
    if all(not r.ok for r in records):
        raise BenchmarkError(f"{endpoint.name} ({endpoint.url}): warmup failed: {records[0].error}")


async def _run_level(
    client: httpx.AsyncClient,
    spec: ServerSpec,
    prompts: Sequence[Prompt],
    concurrency: int,
    config: BenchmarkConfig,
) -> LevelResult:
    sampler = RssSampler(spec.pid, config.rss_interval_s).start() if spec.pid else None
    try:
        records = await run_closed_loop(
            client,
            spec.endpoint,
            prompts,
            concurrency,
            config.requests_for(concurrency),
            config.settings,
        )
    finally:
        if sampler is not None:
            sampler.stop()
    return LevelResult(
        server=spec.endpoint.name,
        stats=aggregate(records, concurrency),
        peak_rss_bytes=sampler.peak_bytes if sampler else None,
        peak_hwm_bytes=sampler.peak_hwm_bytes if sampler else None,
    )
