"""Prefill and decode of synthetic batches straight on a shard: latency and throughput per size."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from tgserve.benchmark.stats import Summary, summarize
from tgserve.pb import generate_pb2 as pb

# Block 0 is the router's health-check block; a benchmark batch never uses it either.
FIRST_BLOCK = 1


class ShardBenchError(RuntimeError):
    """The shard answered something the benchmark cannot measure (wrong counts, no capacity)."""


@dataclass(frozen=True)
class ShardBenchConfig:
    """What one microbenchmark measures: every batch size with the same prompt length."""

    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    prompt_length: int = 180
    decode_steps: int = 32
    runs: int = 3
    warmup_runs: int = 1  # per batch size, not measured
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if self.prompt_length < 1 or self.decode_steps < 0:
            raise ValueError("prompt_length must be >= 1 and decode_steps >= 0")
        if self.runs < 1 or self.warmup_runs < 0:
            raise ValueError("runs must be >= 1 and warmup_runs >= 0")

    @property
    def max_new_tokens(self) -> int:
        """Prefill generates the first token, each decode step one more."""
        return self.decode_steps + 1

    @property
    def kv_tokens_per_request(self) -> int:
        # The last generated token is never fed back, so it needs no KV slot (as the router counts).
        return self.prompt_length + self.max_new_tokens - 1


class ShardBackend(Protocol):
    """The calls of the router's ShardClient this benchmark uses."""

    async def clear_cache(self, batch_id: int | None = None) -> None: ...
    async def info(self) -> pb.InfoResponse: ...
    async def warmup(
        self,
        batch: pb.Batch,
        max_input_tokens: int | None,
        max_prefill_tokens: int,
        max_total_tokens: int | None,
    ) -> pb.WarmupResponse: ...
    async def prefill(self, batch: pb.Batch) -> Any: ...  # ShardStep
    async def decode(self, batches: Sequence[pb.CachedBatch]) -> Any: ...  # ShardStep


@dataclass
class BatchSizeResult:
    """Every measured step of one batch size (warmup runs left out)."""

    batch_size: int
    prompt_length: int
    runs: int = 0
    prefill_s: list[float] = field(default_factory=list)  # client-side wall time, one per run
    prefill_forward_s: list[float] = field(default_factory=list)  # the shard's forward time
    decode_s: list[float] = field(default_factory=list)  # one per decode step
    decode_forward_s: list[float] = field(default_factory=list)
    generated_tokens: int = 0

    @property
    def prefill(self) -> Summary | None:
        return summarize(self.prefill_s)

    @property
    def decode(self) -> Summary | None:
        return summarize(self.decode_s)

    @property
    def prefill_tokens_per_s(self) -> float | None:
        """Prompt tokens computed per second at the median prefill latency."""
        p = self.prefill
        return None if p is None or p.p50 <= 0 else self.batch_size * self.prompt_length / p.p50

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens generated per second at the median decode step latency."""
        d = self.decode
        return None if d is None or d.p50 <= 0 else self.batch_size / d.p50

    def to_dict(self) -> dict[str, Any]:
        def summary(values: list[float]) -> dict[str, float] | None:
            s = summarize(values)
            return None if s is None else asdict(s)

        return {
            "batch_size": self.batch_size,
            "prompt_length": self.prompt_length,
            "runs": self.runs,
            "num_prefills": len(self.prefill_s),
            "num_decode_steps": len(self.decode_s),
            "generated_tokens": self.generated_tokens,
            "prefill_s": summary(self.prefill_s),
            "prefill_forward_s": summary(self.prefill_forward_s),
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_step_s": summary(self.decode_s),
            "decode_forward_s": summary(self.decode_forward_s),
            "decode_tokens_per_s": self.decode_tokens_per_s,
        }


def prompt_ids(config: ShardBenchConfig, vocab_size: int, count: int) -> list[list[int]]:
    """`count` deterministic prompts of random ordinary token ids (low ids are often special)."""
    rng = random.Random(config.seed)
    low = min(256, vocab_size // 4)
    return [
        [rng.randrange(low, vocab_size) for _ in range(config.prompt_length)] for _ in range(count)
    ]


def make_batch(
    batch_id: int, prompts: Sequence[Sequence[int]], config: ShardBenchConfig, block_size: int
) -> pb.Batch:
    """A greedy batch whose requests own consecutive blocks after block 0, slots as the router
    sets them."""
    blocks_per_request = -(-config.kv_tokens_per_request // block_size)
    requests = []
    for i, ids in enumerate(prompts):
        first = FIRST_BLOCK + i * blocks_per_request
        blocks = list(range(first, first + blocks_per_request))
        slots = [b * block_size + j for b in blocks for j in range(block_size)]
        requests.append(
            pb.Request(
                id=i,
                inputs="",
                input_ids=list(ids),
                truncate=len(ids),
                parameters=pb.NextTokenChooserParameters(),  # all defaults: greedy
                stopping_parameters=pb.StoppingCriteriaParameters(
                    max_new_tokens=config.max_new_tokens, ignore_eos_token=True
                ),
                blocks=blocks,
                slots=slots[: config.kv_tokens_per_request],
            )
        )
    return pb.Batch(
        id=batch_id,
        requests=requests,
        size=len(requests),
        max_tokens=len(requests) * (config.prompt_length + config.max_new_tokens),
        max_blocks=blocks_per_request,
    )


def blocks_needed(config: ShardBenchConfig, block_size: int) -> int:
    """Blocks of the largest batch, block 0 included."""
    per_request = -(-config.kv_tokens_per_request // block_size)
    return FIRST_BLOCK + max(config.batch_sizes) * per_request


@dataclass(frozen=True)
class ShardDescription:
    """What the shard said about itself, for the report."""

    model_type: str
    dtype: str
    device_type: str
    block_size: int
    vocab_size: int
    kv_capacity_tokens: int | None


async def warm_up(backend: ShardBackend, config: ShardBenchConfig) -> ShardDescription:
    """ClearCache, Info, then Warmup with the largest batch (which also sizes the KV cache)."""
    await backend.clear_cache(None)
    info = await backend.info()
    block_size = info.block_size or 16
    vocab = info.vocab_size or 32000
    largest = max(config.batch_sizes)
    batch = make_batch(0, prompt_ids(config, vocab, largest), config, block_size)
    answer = await backend.warmup(
        batch,
        config.prompt_length,
        largest * config.prompt_length,
        config.prompt_length + config.max_new_tokens,
    )
    capacity = (
        answer.max_supported_total_tokens if answer.HasField("max_supported_total_tokens") else None
    )
    needed = blocks_needed(config, block_size)
    if capacity is not None and capacity // block_size < needed:
        raise ShardBenchError(
            f"the shard's KV cache holds {capacity} tokens but the largest batch needs "
            f"{needed * block_size}: lower the batch sizes or raise --kv-cache-memory"
        )
    return ShardDescription(
        info.model_type, info.dtype, info.device_type, block_size, vocab, capacity
    )


async def measure(
    backend: ShardBackend,
    config: ShardBenchConfig,
    shard: ShardDescription,
    on_batch_size: Callable[[BatchSizeResult], None] | None = None,
) -> list[BatchSizeResult]:
    """For each batch size: (warmup +) runs of Prefill, `decode_steps` Decodes, ClearCache."""
    batch_ids = itertools.count(1)
    results = []
    for size in config.batch_sizes:
        prompts = prompt_ids(config, shard.vocab_size, size)
        result = BatchSizeResult(batch_size=size, prompt_length=config.prompt_length)
        for run in range(config.warmup_runs + config.runs):
            batch = make_batch(next(batch_ids), prompts, config, shard.block_size)
            sink = result if run >= config.warmup_runs else None
            await _one_run(backend, batch, config, sink)
        results.append(result)
        if on_batch_size is not None:
            on_batch_size(result)
    return results


async def _one_run(
    backend: ShardBackend,
    batch: pb.Batch,
    config: ShardBenchConfig,
    sink: BatchSizeResult | None,
) -> None:
    size = len(batch.requests)
    start = time.perf_counter()
    step = await backend.prefill(batch)
    elapsed = time.perf_counter() - start
    _check(step, size, "Prefill")
    if sink is not None:
        sink.runs += 1
        sink.prefill_s.append(elapsed)
        sink.prefill_forward_s.append(step.timings.forward_ns / 1e9)
        sink.generated_tokens += _tokens(step)
    cached = step.batch
    for i in range(config.decode_steps):
        if cached is None:
            raise ShardBenchError(
                f"the batch ended after {i} of {config.decode_steps} decode steps"
            )
        start = time.perf_counter()
        step = await backend.decode([cached])
        elapsed = time.perf_counter() - start
        _check(step, size, "Decode")
        if sink is not None:
            sink.decode_s.append(elapsed)
            sink.decode_forward_s.append(step.timings.forward_ns / 1e9)
            sink.generated_tokens += _tokens(step)
        cached = step.batch
    if cached is not None:
        raise ShardBenchError("the batch outlived its max_new_tokens")
    await backend.clear_cache(batch.id)


def _tokens(step: Any) -> int:
    return sum(len(g.tokens.ids) for g in step.generations)


def _check(step: Any, size: int, call: str) -> None:
    if len(step.generations) != size:
        raise ShardBenchError(f"{call} answered {len(step.generations)} generations for {size}")
