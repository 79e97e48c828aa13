"""Pooling one server's benchmark rounds (tgserve.benchmark.rounds), as `make bench` does."""

from __future__ import annotations

from typing import Any

import pytest

from tgserve.benchmark.merge import server_from_dict
from tgserve.benchmark.rounds import RoundsError, pool_levels, pool_rounds, round_order


def summary(count: int, mean: float, p50: float) -> dict[str, Any]:
    return {"count": count, "mean": mean, "p50": p50, "p90": 2 * p50, "p99": 3 * p50}


def level(concurrency: int, duration: float, tokens: int, requests: int, ttft_p50: float,
          rss: int | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "concurrency": concurrency, "num_requests": requests, "num_errors": 0,
        "duration_s": duration, "requests_per_s": requests / duration,
        "output_tokens_per_s": tokens / duration, "total_output_tokens": tokens,
        "ttft_s": summary(requests, ttft_p50, ttft_p50), "itl_s": summary(tokens, 0.02, 0.02),
        "tpot_s": None, "e2e_s": summary(requests, 3.0, 3.0), "errors": [],
        "peak_rss_bytes": rss, "peak_hwm_bytes": None,
    }  # fmt: skip


def server(levels: list[dict[str, Any]], name: str = "tgserve", rss: int = 100) -> dict[str, Any]:
    return {"name": name, "url": "http://x", "api": "openai", "model": "m", "pid": 1,
            "peak_rss_bytes": rss, "idle_cpu_percent": 0.5, "levels": levels}  # fmt: skip


def test_rounds_alternate_between_the_order_given_and_its_mirror() -> None:
    assert round_order(["a", "b", "c"], 3) == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]
    assert round_order(["a", "b"], 1) == [["a", "b"]]


def test_rates_are_pooled_over_the_summed_time_not_averaged() -> None:
    # 1000 tokens in 10 s and 1000 in 40 s: 2000 in 50 s is 40 tok/s (the mean of rates: 62.5).
    pooled = pool_levels([level(16, 10.0, 1000, 8, 0.2), level(16, 40.0, 1000, 8, 0.6)])
    assert pooled["output_tokens_per_s"] == pytest.approx(40.0)
    assert pooled["requests_per_s"] == pytest.approx(16 / 50)
    assert pooled["total_output_tokens"] == 2000 and pooled["num_requests"] == 16
    assert pooled["duration_s"] == pytest.approx(50.0)
    # Percentiles: the mean of the rounds' percentiles; counts add up; means weighted by count.
    assert pooled["ttft_s"]["p50"] == pytest.approx(0.4)
    assert pooled["ttft_s"]["p99"] == pytest.approx(1.2)
    assert pooled["ttft_s"]["count"] == 16 and pooled["ttft_s"]["mean"] == pytest.approx(0.4)
    assert pooled["tpot_s"] is None


def test_peaks_are_the_highest_of_any_round() -> None:
    pooled = pool_rounds([
        server([level(1, 5.0, 100, 1, 0.1, rss=300)], rss=300),
        server([level(1, 5.0, 100, 1, 0.1, rss=500)], rss=500),
    ])  # fmt: skip
    assert pooled["peak_rss_bytes"] == 500
    assert pooled["levels"][0]["peak_rss_bytes"] == 500
    assert pooled["rounds"] == 2
    assert pooled["rounds_output_tokens_per_s"] == [[20.0], [20.0]]


def test_a_pooled_server_reads_back_like_a_measured_one() -> None:
    pooled = pool_rounds([
        server([level(1, 5.0, 100, 1, 0.1), level(4, 8.0, 400, 4, 0.3)]),
        server([level(1, 15.0, 100, 1, 0.3), level(4, 8.0, 400, 4, 0.5)]),
    ])  # fmt: skip
    result = server_from_dict(pooled)
    assert [lv.stats.concurrency for lv in result.levels] == [1, 4]
    assert result.levels[0].stats.output_tokens_per_s == pytest.approx(10.0)
    assert result.levels[1].stats.ttft_s is not None
    assert result.levels[1].stats.ttft_s.p50 == pytest.approx(0.4)


def test_rounds_that_disagree_are_refused() -> None:
    with pytest.raises(RoundsError):
        pool_rounds([server([level(1, 5.0, 100, 1, 0.1)]), server([level(4, 5.0, 100, 1, 0.1)])])
    with pytest.raises(RoundsError):
        pool_rounds([server([], name="a"), server([], name="b")])
    with pytest.raises(RoundsError):
        pool_rounds([])
