"""One server measured in several rounds, pooled into one report entry.

`make bench` measures the servers one after another, each alone on the CPU. On a shared machine
the speed of the same code drifts by 10 % or more between windows of a few minutes, which is as
much as the differences being measured; rounds in mirrored order (A B C, then C B A) give every
server the same mix of early and late windows, and pooling them keeps one figure per level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_SUMMARIES = ("ttft_s", "itl_s", "tpot_s", "e2e_s")
_PEAKS = ("peak_rss_bytes", "peak_hwm_bytes")


class RoundsError(ValueError):
    """The rounds do not describe the same server and levels."""


def round_order(names: Sequence[str], rounds: int) -> list[list[str]]:
    """Server order per round: as given, then mirrored, alternately."""
    return [list(names) if r % 2 == 0 else list(reversed(names)) for r in range(rounds)]


def _peak(values: Sequence[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _summary(parts: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Counts add up and means are count-weighted; percentiles cannot be pooled without the
    samples, so each is the mean of the rounds' percentiles."""
    known = [p for p in parts if p is not None and p["count"] > 0]
    if not known:
        return None
    count = sum(p["count"] for p in known)
    return {
        "count": count,
        "mean": sum(p["mean"] * p["count"] for p in known) / count,
        **{q: sum(p[q] for p in known) / len(known) for q in ("p50", "p90", "p99")},
    }


def pool_levels(levels: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One concurrency level's results from every round as one: rates over the summed time."""
    concurrencies = {level["concurrency"] for level in levels}
    if len(concurrencies) != 1:
        raise RoundsError(f"levels of different concurrency pooled: {sorted(concurrencies)}")
    duration = sum(level["duration_s"] for level in levels)
    completed = sum(level["requests_per_s"] * level["duration_s"] for level in levels)
    tokens = sum(level["total_output_tokens"] for level in levels)
    return {
        "concurrency": levels[0]["concurrency"],
        "num_requests": sum(level["num_requests"] for level in levels),
        "num_errors": sum(level["num_errors"] for level in levels),
        "duration_s": duration,
        "requests_per_s": completed / duration if duration > 0 else 0.0,
        "output_tokens_per_s": tokens / duration if duration > 0 else 0.0,
        "total_output_tokens": tokens,
        **{key: _summary([level.get(key) for level in levels]) for key in _SUMMARIES},
        "errors": [error for level in levels for error in level.get("errors", [])],
        **{key: _peak([level.get(key) for level in levels]) for key in _PEAKS},
    }


def pool_rounds(servers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One server's report entries from several rounds as one entry (the first round's
    description, levels pooled, peaks the highest of any round)."""
    if not servers:
        raise RoundsError("no rounds to pool")
    if len({server["name"] for server in servers}) != 1:
        raise RoundsError("rounds of different servers pooled")
    shapes = {tuple(level["concurrency"] for level in server["levels"]) for server in servers}
    if len(shapes) != 1:
        raise RoundsError(f"the rounds ran different concurrency levels: {sorted(shapes)}")
    pooled = dict(servers[0])
    pooled["levels"] = [pool_levels(levels) for levels in zip(*(s["levels"] for s in servers))]
    pooled["peak_rss_bytes"] = _peak([server.get("peak_rss_bytes") for server in servers])
    idle = [server.get("idle_cpu_percent") for server in servers]
    pooled["idle_cpu_percent"] = None if None in idle else max(i for i in idle if i is not None)
    pooled["rounds"] = len(servers)
    pooled["rounds_output_tokens_per_s"] = [
        [level["output_tokens_per_s"] for level in server["levels"]] for server in servers
    ]
    return pooled
