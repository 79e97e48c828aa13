"""Pure statistics of a benchmark run: percentiles, per-request latencies, per-level aggregates."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    """The timeline of one streamed request (perf_counter seconds) and what it produced."""

    prompt_index: int
    start: float
    end: float = math.nan
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def first_token_time(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None


@dataclass(frozen=True)
class Summary:
    """Mean and p50/p90/p99 of one latency metric, in seconds."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float


@dataclass(frozen=True)
class LevelStats:
    """Aggregates of all requests run at one concurrency level against one server."""

    concurrency: int
    num_requests: int
    num_errors: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    total_output_tokens: int
    ttft_s: Summary | None
    itl_s: Summary | None
    tpot_s: Summary | None
    e2e_s: Summary | None
    errors: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LevelStats:
        """The inverse of `to_dict` (keys it does not know, such as RSS, are ignored)."""

        def summary(key: str) -> Summary | None:
            return None if data.get(key) is None else Summary(**data[key])

        return cls(
            concurrency=int(data["concurrency"]),
            num_requests=int(data["num_requests"]),
            num_errors=int(data["num_errors"]),
            duration_s=float(data["duration_s"]),
            requests_per_s=float(data["requests_per_s"]),
            output_tokens_per_s=float(data["output_tokens_per_s"]),
            total_output_tokens=int(data["total_output_tokens"]),
            ttft_s=summary("ttft_s"),
            itl_s=summary("itl_s"),
            tpot_s=summary("tpot_s"),
            e2e_s=summary("e2e_s"),
            errors=tuple(data.get("errors", ())),
        )


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def summarize(values: Sequence[float]) -> Summary | None:
    """Mean and p50/p90/p99 of `values`; None when there are none."""
    if not values:
        return None
    return Summary(
        count=len(values),
        mean=math.fsum(values) / len(values),
        p50=percentile(values, 50),
        p90=percentile(values, 90),
        p99=percentile(values, 99),
    )


def ttft(record: RequestRecord) -> float | None:
    """Time to first token: start to the first token-bearing chunk."""
    first = record.first_token_time
    return None if first is None else first - record.start


def e2e(record: RequestRecord) -> float:
    """End-to-end latency: start to the end of the stream."""
    return record.end - record.start


def itl(record: RequestRecord) -> list[float]:
    """Inter-token latencies: gaps between consecutive token chunks after the first."""
    times = record.chunk_times
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def tpot(record: RequestRecord) -> float | None:
    """Time per output token after the first: (e2e - ttft) / (n - 1); None when n < 2."""
    first = ttft(record)
    if first is None or record.output_tokens < 2:
        return None
    return (e2e(record) - first) / (record.output_tokens - 1)


def aggregate(
    records: Sequence[RequestRecord], concurrency: int, max_error_texts: int = 5
) -> LevelStats:
    """Throughput over the level's wall-clock span and latency summaries of successful requests."""
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    duration = _span(records)
    total_tokens = sum(r.output_tokens for r in ok)
    distinct_errors = list(dict.fromkeys(r.error for r in failed if r.error))
    return LevelStats(
        concurrency=concurrency,
        num_requests=len(records),
        num_errors=len(failed),
        duration_s=duration,
        requests_per_s=len(ok) / duration if duration > 0 else 0.0,
        output_tokens_per_s=total_tokens / duration if duration > 0 else 0.0,
        total_output_tokens=total_tokens,
        ttft_s=summarize(_present(ttft(r) for r in ok)),
        itl_s=summarize([gap for r in ok for gap in itl(r)]),
        tpot_s=summarize(_present(tpot(r) for r in ok)),
        e2e_s=summarize([e2e(r) for r in ok]),
        errors=tuple(distinct_errors[:max_error_texts]),
    )


def _span(records: Sequence[RequestRecord]) -> float:
    """Seconds from the first request's start to the last request's end."""
    ends = [r.end for r in records if not math.isnan(r.end)]
    if not records or not ends:
        return 0.0
    return max(ends) - min(r.start for r in records)


def _present(values: Any) -> list[float]:
    return [v for v in values if v is not None]
