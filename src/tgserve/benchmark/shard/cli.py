"""`tgserve benchmark-shard`: start a shard (or connect to one) and print prefill/decode figures."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tgserve import env, uds
from tgserve.benchmark.cli import parse_concurrency
from tgserve.benchmark.shard.measure import (
    BatchSizeResult,
    ShardBenchConfig,
    ShardBenchError,
    ShardDescription,
    measure,
    warm_up,
)
from tgserve.config import KV_CACHE_DTYPES, Config, parse_bytes
from tgserve.launcher import supervisor
from tgserve.launcher.processes import Child
from tgserve.launcher.weights import resolve_model
from tgserve.router.shard_client import ShardClient
from tgserve.router.types import GenerationError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model-id", help="as the launcher's --model-id (default: the packaged SmolLM2-135M)")
    add("--uds-path", help="measure the running shard on this socket instead of starting one")
    add("--dtype", help="float32, float16 or bfloat16 (default: the shard's choice)")
    add("--threads", type=int, default=0, help="torch threads of the shard (0: torch's choice)")
    add("--kv-cache-memory", type=parse_bytes, help="KV cache budget of the shard, e.g. 512MiB")
    add("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
        help="as the launcher's (default: the model's)")
    add("--batch-sizes", type=parse_concurrency, default=(1, 2, 4, 8, 16, 32), help="e.g. 1,8,32")
    add("--prompt-length", type=int, default=180, help="prompt tokens of every request")
    add("--decode-steps", type=int, default=32, help="Decode calls after each Prefill")
    add("--runs", type=int, default=3, help="measured runs per batch size")
    add("--warmup-runs", type=int, default=1, help="unmeasured runs per batch size first")
    add("--seed", type=int, default=0, help="seed of the random prompt ids")
    add("--startup-timeout", type=float, default=600.0, help="seconds to wait for the shard")
    add("--out", type=Path, help="also write the report as JSON here")


def build_config(args: argparse.Namespace) -> ShardBenchConfig:
    return ShardBenchConfig(
        batch_sizes=tuple(args.batch_sizes),
        prompt_length=args.prompt_length,
        decode_steps=args.decode_steps,
        runs=args.runs,
        warmup_runs=args.warmup_runs,
        seed=args.seed,
    )


def shard_config(args: argparse.Namespace, uds_base: str) -> Config:
    """The launcher's configuration of a one-rank shard for --model-id, defaults elsewhere."""
    source = resolve_model(args.model_id, None, None, env.cache_dir())
    config = Config(
        shard_uds_path=uds_base, threads=args.threads,
        dtype=args.dtype, kv_cache_memory=args.kv_cache_memory,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    return supervisor.resolved(config, source, world_size=1)


@contextlib.contextmanager
def started_shard(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """Spawns the shard, waits for its socket; yields (socket, model id); stops it at the end."""
    uds_base = os.path.join(tempfile.gettempdir(), f"tgserve-shard-bench-{os.getpid()}")
    socket_path = f"{uds_base}-0"
    uds.remove_stale(socket_path)
    config = shard_config(args, uds_base)
    model_id = config.model_name
    # The launcher's own shard command and environment.
    child = Child.spawn("shard-0", *supervisor.shard_command(config, rank=0))
    try:
        deadline = time.monotonic() + args.startup_timeout
        while not os.path.exists(socket_path):
            if child.exit_code is not None:
                raise ShardBenchError(
                    f"the shard exited with code {child.exit_code}:\n{child.last_lines()}"
                )
            if time.monotonic() > deadline:
                raise ShardBenchError(f"the shard was not ready after {args.startup_timeout}s")
            time.sleep(0.1)
        yield socket_path, model_id
    finally:
        child.terminate(10)


async def run_on(
    socket_path: str, config: ShardBenchConfig
) -> tuple[ShardDescription, list[BatchSizeResult]]:
    client = await ShardClient.connect(socket_path)
    try:
        shard = await warm_up(client, config)
        return shard, await measure(client, config, shard, on_batch_size=_progress)
    finally:
        await client.close()


def _progress(result: BatchSizeResult) -> None:
    print(f"batch size {result.batch_size}: done", file=sys.stderr, flush=True)


TABLE_HEADER = (
    "batch",
    "prefill ms p50",
    "prefill ms p90",
    "prefill tok/s",
    "decode ms p50",
    "decode ms p90",
    "decode tok/s",
    "steps",
    "tokens",
)


def format_table(results: list[BatchSizeResult]) -> str:
    """One row per batch size: latency of the whole batch's step and tokens per second."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f}"

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    rows = [list(TABLE_HEADER)]
    for r in results:
        p, d = r.prefill, r.decode
        rows.append([
            str(r.batch_size),
            ms(p.p50 if p else None),
            ms(p.p90 if p else None),
            rate(r.prefill_tokens_per_s),
            ms(d.p50 if d else None),
            ms(d.p90 if d else None),
            rate(r.decode_tokens_per_s),
            str(len(r.decode_s)),
            str(r.generated_tokens),
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_json_dict(
    model_id: str, config: ShardBenchConfig, shard: ShardDescription, results: list[BatchSizeResult]
) -> dict[str, Any]:
    return {
        "model_id": model_id,
        "config": dataclasses.asdict(config),
        "shard": dataclasses.asdict(shard),
        "batch_sizes": [r.to_dict() for r in results],
    }


def run(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
        if args.uds_path:
            model_id = "(running shard)"
            shard, results = asyncio.run(run_on(args.uds_path, config))
        else:
            with started_shard(args) as (socket_path, model_id):
                shard, results = asyncio.run(run_on(socket_path, config))
    except (ValueError, ShardBenchError, GenerationError) as exc:
        print(f"tgserve benchmark-shard: {exc}", file=sys.stderr)
        return 1
    print(
        f"{model_id}: {shard.model_type} {shard.dtype} on {shard.device_type}, "
        f"prompt {config.prompt_length} tokens, {config.decode_steps} decode steps, "
        f"{config.runs} runs per batch size"
    )
    print(format_table(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        data = to_json_dict(model_id, config, shard, results)
        args.out.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tgserve benchmark-shard",
        description="Prefill and decode latency and throughput per batch size, straight on a "
        "shard over gRPC (no router): Warmup, then per batch size Prefill, N Decode, ClearCache.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
