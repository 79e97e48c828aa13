"""The `tgserve benchmark` subcommand: flags, one or two servers, the sweep, and the report."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from tgserve.benchmark.client import APIS, Endpoint, GenerationSettings
from tgserve.benchmark.merge import format_report
from tgserve.benchmark.report import write_report
from tgserve.benchmark.runner import (
    BenchmarkConfig,
    BenchmarkError,
    LevelResult,
    ServerSpec,
    run_benchmark,
)

T = TypeVar("T")


def parse_concurrency(text: str) -> tuple[int, ...]:
    """'1,4,16,64' -> (1, 4, 16, 64)."""
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1, got {text!r}")
    return levels


def parse_request_counts(text: str) -> int | tuple[int, ...]:
    """'64' -> 64 (every level); '8,16,64' -> (8, 16, 64), one per --concurrency level."""
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer or comma-separated integers, got {text!r}"
        ) from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"request counts must be >= 1, got {text!r}")
    return counts[0] if len(counts) == 1 and "," not in text else counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers the benchmark's flags on `parser`."""
    add = parser.add_argument
    add("--url", action="append", required=True, help="server base URL (repeat for more servers)")
    add("--name", action="append", default=[], help="display name of each --url, in order")
    add("--server-pid", action="append", type=int, default=[], help="PID of each --url, for RSS")
    add("--peer-url", help="a second server, measured in the same invocation")
    add("--peer-name", help="display name of --peer-url")
    add("--peer-pid", type=int, help="PID of the peer server, for RSS")
    add(
        "--api",
        choices=APIS,
        default="openai",
        help="openai: /v1/completions; tgi: /generate_stream",
    )
    add("--peer-api", choices=APIS, help="API of the peer (default: --api)")
    add("--model", help="model name sent in OpenAI requests (default: asked from /v1/models)")
    add("--peer-model", help="model name for the peer (default: asked from its /v1/models)")
    add("--concurrency", type=parse_concurrency, default=(1, 4, 16, 64), help="e.g. 1,4,16,64")
    add("--num-prompts", type=int, default=64, help="distinct deterministic prompts")
    add(
        "--num-requests",
        type=parse_request_counts,
        help="requests per level and server: one count, or one per --concurrency level, e.g. "
        "8,16,64,64 (default: --num-prompts)",
    )
    add("--max-new-tokens", type=int, default=128)
    add("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    add(
        "--include-usage",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask OpenAI servers for stream usage, the exact output token count",
    )
    add("--seed", type=int, default=0, help="seed of the prompt set")
    add("--warmup", type=int, default=2, help="warmup requests per server before the sweep")
    add("--timeout", type=float, default=600.0, help="seconds per request")
    add(
        "--idle-cpu-seconds",
        type=float,
        default=0.0,
        help="after warmup, watch each --server-pid this long and report the CPU it burns idle",
    )
    add("--out-dir", type=Path, help="write benchmark.json and benchmark.png here")


def normalize_url(url: str) -> str:
    """Base URL without a trailing slash or /v1 (the client adds the route)."""
    url = url.rstrip("/")
    return url.removesuffix("/v1")


def _default_name(url: str, taken: set[str]) -> str:
    parts = urlsplit(url)
    name = parts.netloc or url
    candidate, suffix = name, 2
    while candidate in taken:
        candidate, suffix = f"{name}#{suffix}", suffix + 1
    return candidate


def build_servers(args: argparse.Namespace) -> tuple[ServerSpec, ...]:
    """--url/--name/--server-pid lists plus the optional peer, in that order."""
    entries = [
        (url, _at(args.name, i), _at(args.server_pid, i), args.api, args.model)
        for i, url in enumerate(args.url)
    ]
    if args.peer_url:
        api = args.peer_api or args.api
        entries.append((args.peer_url, args.peer_name, args.peer_pid, api, args.peer_model))
    specs: list[ServerSpec] = []
    taken: set[str] = set()
    for url, name, pid, api, model in entries:
        url = normalize_url(url)
        name = name or _default_name(url, taken)
        taken.add(name)
        specs.append(ServerSpec(Endpoint(name=name, url=url, api=api, model=model), pid))
    return tuple(specs)


def _at(values: Sequence[T], index: int) -> T | None:
    return values[index] if index < len(values) else None


def build_config(args: argparse.Namespace) -> BenchmarkConfig:
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        ignore_eos=args.ignore_eos,
        include_usage=args.include_usage,
    )
    return BenchmarkConfig(
        servers=build_servers(args),
        concurrency=tuple(args.concurrency),
        num_prompts=args.num_prompts,
        num_requests=args.num_requests,
        warmup_requests=args.warmup,
        seed=args.seed,
        settings=settings,
        timeout_s=args.timeout,
        idle_cpu_s=args.idle_cpu_seconds,
    )


def _progress(level: LevelResult) -> None:
    s = level.stats
    print(
        f"[{level.server}] concurrency {s.concurrency}: {s.requests_per_s:.2f} req/s, "
        f"{s.output_tokens_per_s:.1f} output tok/s, {s.num_errors} errors",
        file=sys.stderr,
        flush=True,
    )


def run(args: argparse.Namespace) -> int:
    """Runs the sweep and prints the table (and ratios); 1 when the benchmark cannot run."""
    try:
        config = build_config(args)
        results = asyncio.run(run_benchmark(config, on_level=_progress))
    except (ValueError, BenchmarkError) as exc:
        print(f"tgserve benchmark: {exc}", file=sys.stderr)
        return 1
    print(format_report(results))
    if args.out_dir is not None:
        paths = write_report(args.out_dir, config, results)
        print(f"\nwrote {paths.json}")
        if paths.png is None:
            print("no plot: matplotlib is not installed", file=sys.stderr)
        else:
            print(f"wrote {paths.png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`tgserve benchmark [flags]`, or `tgserve benchmark merge FILE...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        from tgserve.benchmark import merge

        return merge.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="tgserve benchmark",
        description="Closed-loop load generator for OpenAI-compatible and TGI servers. "
        "`tgserve benchmark merge FILE...` merges the reports of separate runs.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
