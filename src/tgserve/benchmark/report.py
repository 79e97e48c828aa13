"""Benchmark reports: a text table, a JSON file, a PNG plot, and ratios between two servers."""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tgserve.benchmark.runner import BenchmarkConfig, LevelResult, ServerResult
from tgserve.benchmark.stats import LevelStats, Summary

JSON_NAME = "benchmark.json"
PNG_NAME = "benchmark.png"
MIB = 1024 * 1024

# Metrics compared between servers: (key in the ratio, how to read it from a level).
RATIO_METRICS: tuple[tuple[str, str, str | None], ...] = (
    ("requests_per_s", "requests_per_s", None),
    ("output_tokens_per_s", "output_tokens_per_s", None),
    ("ttft_p50", "ttft_s", "p50"),
    ("itl_p50", "itl_s", "p50"),
    ("tpot_p50", "tpot_s", "p50"),
    ("e2e_p50", "e2e_s", "p50"),
    ("e2e_p99", "e2e_s", "p99"),
)


@dataclass(frozen=True)
class ReportPaths:
    """Where the report files went; `png` is None when matplotlib is missing."""

    json: Path
    png: Path | None


def _metric(stats: LevelStats, attribute: str, quantile: str | None) -> float | None:
    value = getattr(stats, attribute)
    if quantile is None:
        return float(value)
    return None if value is None else float(getattr(value, quantile))


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def compute_ratios(first: ServerResult, second: ServerResult) -> list[dict[str, Any]]:
    """first / second for each concurrency both measured (throughput > 1 and latency < 1: first
    is better)."""
    rows = []
    for level in first.levels:
        other = second.level(level.stats.concurrency)
        if other is None:
            continue
        row: dict[str, Any] = {"concurrency": level.stats.concurrency}
        for key, attribute, quantile in RATIO_METRICS:
            row[key] = _ratio(
                _metric(level.stats, attribute, quantile), _metric(other.stats, attribute, quantile)
            )
        row["peak_rss"] = _ratio(level.peak_rss_bytes, other.peak_rss_bytes)
        rows.append(row)
    return rows


def _ms(summary: Summary | None, *quantiles: str) -> str:
    if summary is None:
        return "-"
    return "/".join(f"{getattr(summary, q) * 1000:.1f}" for q in quantiles)


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


def _table_row(level: LevelResult) -> list[str]:
    s = level.stats
    return [
        level.server,
        str(s.concurrency),
        f"{s.requests_per_s:.2f}",
        f"{s.output_tokens_per_s:.1f}",
        _ms(s.ttft_s, "p50", "p90", "p99"),
        _ms(s.itl_s, "p50", "p90", "p99"),
        _ms(s.tpot_s, "p50", "p90", "p99"),
        _ms(s.e2e_s, "p50", "p90", "p99"),
        f"{s.num_errors}/{s.num_requests}",
        _mib(level.peak_rss_bytes),
    ]


TABLE_HEADER = [
    "server",
    "conc",
    "req/s",
    "out tok/s",
    "TTFT ms p50/90/99",
    "ITL ms p50/90/99",
    "TPOT ms p50/90/99",
    "E2E ms p50/90/99",
    "errors",
    "peak RSS MiB",
]


def _align(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(results: Sequence[ServerResult]) -> str:
    """One row per server and concurrency level."""
    rows = [TABLE_HEADER] + [_table_row(lv) for r in results for lv in r.levels]
    return _align(rows)


# Side-by-side columns: (title, how to render one level).
SIDE_BY_SIDE: tuple[tuple[str, Any], ...] = (
    ("out tok/s", lambda lv: f"{lv.stats.output_tokens_per_s:.1f}"),
    ("TTFT p50 ms", lambda lv: _ms(lv.stats.ttft_s, "p50")),
    ("ITL p50 ms", lambda lv: _ms(lv.stats.itl_s, "p50")),
    ("peak RSS MiB", lambda lv: _mib(lv.peak_rss_bytes)),
)


def format_side_by_side(results: Sequence[ServerResult]) -> str:
    """One row per concurrency level; each metric has a column per server, in the given order."""
    levels = sorted({lv.stats.concurrency for r in results for lv in r.levels})
    names = [r.name for r in results]
    groups = ["", *(title for title, _ in SIDE_BY_SIDE for _ in names)]
    rows = [["conc", *(name for _ in SIDE_BY_SIDE for name in names)]]
    for concurrency in levels:
        row = [str(concurrency)]
        for _, render in SIDE_BY_SIDE:
            for result in results:
                level = result.level(concurrency)
                row.append("-" if level is None else render(level))
        rows.append(row)
    # A title wider than its servers' columns widens the first of them.
    for g, (title, _) in enumerate(SIDE_BY_SIDE):
        first = 1 + g * len(names)
        widths = [max(len(row[c]) for row in rows) for c in range(first, first + len(names))]
        deficit = len(title) - (sum(widths) + 2 * (len(names) - 1))
        if deficit > 0:
            rows[0][first] = rows[0][first].rjust(widths[0] + deficit)
    table = _align(rows)
    widths = [len(cell) for cell in table.splitlines()[1].split("  ")]
    text = _group_header(groups, widths) + "\n" + table
    idle = [
        f"{r.name} {r.idle_cpu_percent:.1f}%" for r in results if r.idle_cpu_percent is not None
    ]
    if idle:
        text += "\nidle CPU after warmup (100% = one core): " + ", ".join(idle)
    return text


def _group_header(groups: Sequence[str], widths: Sequence[int]) -> str:
    """Each metric's title centred over its servers' columns."""
    cells: list[str] = []
    i = 0
    while i < len(groups):
        j = i
        while j + 1 < len(groups) and groups[j + 1] == groups[i]:
            j += 1
        span = sum(widths[i : j + 1]) + 2 * (j - i)
        cells.append(groups[i].center(span))
        i = j + 1
    return "  ".join(cells).rstrip()


def format_ratios(first: ServerResult, second: ServerResult) -> str:
    """The ratio table with a line saying which way is better."""
    ratios = compute_ratios(first, second)
    keys = [key for key, _, _ in RATIO_METRICS] + ["peak_rss"]
    rows = [["conc", *keys]]
    for row in ratios:
        rows.append([str(row["concurrency"])] + [_fmt_ratio(row[k]) for k in keys])
    title = (
        f"ratios {first.name} / {second.name} "
        f"(throughput > 1 and latency or RSS < 1 mean {first.name} is better)"
    )
    return title + "\n" + _align(rows)


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def server_dict(result: ServerResult) -> dict[str, Any]:
    return {
        "name": result.name,
        "url": result.spec.endpoint.url,
        "api": result.spec.endpoint.api,
        "model": result.spec.endpoint.model,
        "pid": result.spec.pid,
        "peak_rss_bytes": result.peak_rss_bytes,
        "idle_cpu_percent": result.idle_cpu_percent,
        "levels": [
            {
                **lv.stats.to_dict(),
                "peak_rss_bytes": lv.peak_rss_bytes,
                "peak_hwm_bytes": lv.peak_hwm_bytes,
            }
            for lv in result.levels
        ],
    }


def to_json_dict(config: BenchmarkConfig, results: Sequence[ServerResult]) -> dict[str, Any]:
    """The whole run: settings, every level's statistics, and ratios against the first server."""
    settings = dataclasses.asdict(config)
    settings.pop("servers")
    settings["requests_per_level"] = config.requests_per_level
    return {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": settings,
        "servers": [server_dict(r) for r in results],
        "ratios": [
            {
                "first": results[0].name,
                "second": other.name,
                "levels": compute_ratios(results[0], other),
            }
            for other in results[1:]
        ],
    }


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


PLOT_PANELS: tuple[tuple[str, str, str | None, float], ...] = (
    ("output tokens/s", "output_tokens_per_s", None, 1.0),
    ("TTFT p50 (ms)", "ttft_s", "p50", 1000.0),
    ("TPOT p50 (ms)", "tpot_s", "p50", 1000.0),
    ("end-to-end p50 (s)", "e2e_s", "p50", 1.0),
)


def write_plot(path: Path, results: Sequence[ServerResult]) -> Path | None:
    """Throughput and latency against concurrency, one line per server; None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=(11, 8), layout="constrained")
    FigureCanvasAgg(figure)  # an explicit Agg canvas: no pyplot, no global backend switch
    for axes, (title, attribute, quantile, scale) in zip(figure.subplots(2, 2).flat, PLOT_PANELS):
        for result in results:
            points = [
                (lv.stats.concurrency, _metric(lv.stats, attribute, quantile))
                for lv in result.levels
            ]
            xs = [x for x, y in points if y is not None]
            ys = [y * scale for _, y in points if y is not None]
            axes.plot(xs, ys, marker="o", label=result.name)
        levels = sorted({lv.stats.concurrency for r in results for lv in r.levels})
        axes.set_xscale("log", base=2)
        axes.set_xticks(levels, [str(level) for level in levels])
        axes.set_ylim(bottom=0)
        axes.set_xlabel("concurrency")
        axes.set_title(title)
        axes.grid(True, alpha=0.3)
        axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def write_report(
    out_dir: Path, config: BenchmarkConfig, results: Sequence[ServerResult]
) -> ReportPaths:
    """benchmark.json and benchmark.png under `out_dir`."""
    json_path = write_json(out_dir / JSON_NAME, to_json_dict(config, results))
    return ReportPaths(json=json_path, png=write_plot(out_dir / PNG_NAME, results))
