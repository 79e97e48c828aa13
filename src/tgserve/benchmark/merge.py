"""`tgserve benchmark merge`: several runs' benchmark.json files as one report, table and plot.

Servers measured one after another (so that none shares the CPU with another) each leave their
own benchmark.json; merging reads them back and reports them as if measured in one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tgserve.benchmark.client import Endpoint
from tgserve.benchmark.report import (
    JSON_NAME,
    PNG_NAME,
    ReportPaths,
    compute_ratios,
    format_ratios,
    format_side_by_side,
    format_table,
    server_dict,
    write_json,
    write_plot,
)
from tgserve.benchmark.runner import LevelResult, ServerResult, ServerSpec
from tgserve.benchmark.stats import LevelStats


class MergeError(ValueError):
    """The files cannot be merged (unreadable, or two servers with one name)."""


def server_from_dict(data: dict[str, Any]) -> ServerResult:
    """One entry of a report's "servers" list back as a ServerResult."""
    endpoint = Endpoint(
        name=data["name"], url=data["url"], api=data.get("api", "openai"), model=data.get("model")
    )
    levels = [
        LevelResult(
            server=data["name"],
            stats=LevelStats.from_dict(level),
            peak_rss_bytes=level.get("peak_rss_bytes"),
            peak_hwm_bytes=level.get("peak_hwm_bytes"),
        )
        for level in data["levels"]
    ]
    return ServerResult(ServerSpec(endpoint, data.get("pid")), levels, data.get("idle_cpu_percent"))


def load_report(path: Path) -> dict[str, Any]:
    """A benchmark.json, or the one inside a folder."""
    if path.is_dir():
        path = path / JSON_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MergeError(f"{path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("servers"), list):
        raise MergeError(f"{path}: not a benchmark report (no servers list)")
    return data


def merge_reports(
    reports: Sequence[dict[str, Any]], sources: Sequence[str] | None = None
) -> tuple[dict[str, Any], list[ServerResult]]:
    """The servers of every report in order, with ratios of each against the first server."""
    results: list[ServerResult] = []
    extras: list[dict[str, Any]] = []
    for report in reports:
        for server in report["servers"]:
            results.append(server_from_dict(server))
            extras.append({k: v for k, v in server.items() if k not in _SERVER_KEYS})
    names = [r.name for r in results]
    if not results:
        raise MergeError("the reports hold no server")
    if len(set(names)) != len(names):
        raise MergeError(f"server names must differ across the merged reports, got {names}")
    sources = list(sources) if sources is not None else [f"#{i}" for i in range(len(reports))]
    servers = [{**server_dict(r), **extra} for r, extra in zip(results, extras)]
    data = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": reports[0].get("config"),
        "sources": [
            {"source": source, "created": report.get("created"), "config": report.get("config")}
            for source, report in zip(sources, reports)
        ],
        "servers": servers,
        "ratios": [
            {
                "first": results[0].name,
                "second": other.name,
                "levels": compute_ratios(results[0], other),
            }
            for other in results[1:]
        ],
    }
    return data, results


# Keys server_dict writes; anything else a report's server carries is kept as it is.
_SERVER_KEYS = frozenset(
    {"name", "url", "api", "model", "pid", "peak_rss_bytes", "idle_cpu_percent", "levels"}
)


def write_merged(
    out_dir: Path, data: dict[str, Any], results: Sequence[ServerResult]
) -> ReportPaths:
    json_path = write_json(out_dir / JSON_NAME, data)
    return ReportPaths(json=json_path, png=write_plot(out_dir / PNG_NAME, results))


def format_report(results: Sequence[ServerResult]) -> str:
    """Side-by-side summary, the full table, and ratios against the first server."""
    parts = [format_side_by_side(results), format_table(results)]
    parts += [format_ratios(results[0], other) for other in results[1:]]
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tgserve benchmark merge",
        description="Merge benchmark.json files (or folders holding one) into one report.",
    )
    parser.add_argument("reports", nargs="+", type=Path, help="benchmark.json files or folders")
    parser.add_argument("--out-dir", type=Path, help="write the merged benchmark.json and .png")
    args = parser.parse_args(argv)
    try:
        data, results = merge_reports(
            [load_report(p) for p in args.reports], [str(p) for p in args.reports]
        )
    except MergeError as exc:
        print(f"tgserve benchmark merge: {exc}", file=sys.stderr)
        return 1
    print(format_report(results))
    if args.out_dir is not None:
        paths = write_merged(args.out_dir, data, results)
        print(f"\nwrote {paths.json}")
        print(f"wrote {paths.png}" if paths.png else "no plot: matplotlib is not installed")
    return 0
