"""Tests of what `make bench` adds to the load generator: per-level request counts, idle CPU,
the side-by-side table, and merging the reports of servers measured one after another."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

import pytest

from tests.unit.test_benchmark import (
    FakeServer,
    _asgi,
    _config,
    _fake_proc,
    _level,
    _parse,
    _result,
)
from tgserve.benchmark import cli, merge, report, rss, runner, stats


def _run_to(out: Path, names: list[str], **kwargs: object) -> Path:
    """Runs fakes named `names` and writes their report under `out`."""
    fakes = {name: FakeServer() for name in names}
    config = _config(names, **kwargs)
    results = asyncio.run(runner.run_benchmark(config, _asgi(fakes)))
    return report.write_report(out, config, results).json


# --------------------------------------------------------------------------------------------
# Request counts per level.


def test_request_counts_per_level() -> None:
    fake = FakeServer()
    config = _config(
        ["a"], concurrency=(1, 4), num_prompts=8, num_requests=(2, 5), warmup_requests=0
    )
    assert config.requests_per_level == [2, 5]
    results = asyncio.run(runner.run_benchmark(config, _asgi({"a": fake})))
    assert [lv.stats.num_requests for lv in results[0].levels] == [2, 5]
    assert len(fake.payloads) == 7


def test_request_counts_must_match_the_levels() -> None:
    with pytest.raises(ValueError, match="one per level"):
        _config(["a"], concurrency=(1, 4), num_requests=(2, 5, 6))
    with pytest.raises(ValueError):
        _config(["a"], concurrency=(1,), num_requests=0)
    assert _config(["a"], concurrency=(1, 4), num_requests=3).requests_per_level == [3, 3]
    assert _config(["a"], concurrency=(1, 4), num_prompts=6).requests_per_level == [6, 6]


def test_cli_parses_one_or_several_request_counts() -> None:
    assert cli.parse_request_counts("64") == 64
    assert cli.parse_request_counts("8,16,64") == (8, 16, 64)
    assert cli.parse_request_counts("8,") == (8,)
    args = _parse(["--url", "http://h", "--concurrency", "1,16", "--num-requests", "8,64"])
    assert cli.build_config(args).requests_per_level == [8, 64]
    for bad in ("x", "0", "8,-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_request_counts(bad)


# --------------------------------------------------------------------------------------------
# Idle CPU.


def test_cpu_seconds_reads_utime_and_stime(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, {1: (0, 1, 1), 10: (1, 1, 1), 11: (10, 1, 1)})
    ticks = os.sysconf("SC_CLK_TCK")
    for pid, (ppid, user, system) in {10: (1, 3 * ticks, ticks), 11: (10, ticks, 0)}.items():
        fields = ["S", str(ppid)] + ["0"] * 9 + [str(user), str(system)] + ["0"] * 5
        (proc / str(pid) / "stat").write_text(f"{pid} (a (b) c) {' '.join(fields)}\n")
    assert rss.cpu_seconds(10, proc) == pytest.approx(4.0)
    assert rss.tree_cpu_seconds(10, proc) == pytest.approx(5.0)
    assert rss.cpu_seconds(999, proc) == 0.0


def test_idle_cpu_is_measured_after_warmup_for_local_servers() -> None:
    config = _config(["a"], concurrency=(1,), num_prompts=2, warmup_requests=1, idle_cpu_s=0.05)
    spec = runner.ServerSpec(config.servers[0].endpoint, os.getpid())
    config = runner.BenchmarkConfig(**{**config.__dict__, "servers": (spec,)})
    results = asyncio.run(runner.run_benchmark(config, _asgi({"a": FakeServer()})))
    assert results[0].idle_cpu_percent is not None and results[0].idle_cpu_percent >= 0.0
    data = report.to_json_dict(config, results)
    assert data["servers"][0]["idle_cpu_percent"] == results[0].idle_cpu_percent


# --------------------------------------------------------------------------------------------
# Side-by-side table.


def test_side_by_side_has_a_row_per_level_and_a_column_per_server() -> None:
    ours = _result("ours", [_level("ours", 1, 200, 0.1, 300), _level("ours", 16, 600, 0.2, 310)])
    peer = _result("peer", [_level("peer", 1, 100, 0.4, 600)])
    ours.idle_cpu_percent = 0.5
    lines = report.format_side_by_side([ours, peer]).splitlines()
    assert "out tok/s" in lines[0] and "peak RSS MiB" in lines[0]
    assert lines[1].split() == ["conc"] + ["ours", "peer"] * 4
    assert lines[3].split() == ["1", "200.0", "100.0", "100.0", "400.0", "100.0", "400.0"] + [
        "300",
        "600",
    ]
    assert lines[4].split()[:3] == ["16", "600.0", "-"]
    assert lines[5] == "idle CPU after warmup (100% = one core): ours 0.5%"


def test_side_by_side_widens_columns_under_long_titles() -> None:
    lines = report.format_side_by_side([_result("a", [_level("a", 1, 2, 0.1, 3)])]).splitlines()
    assert len(lines[0]) <= len(lines[1])
    assert lines[0].split("  ")[-1].strip() == "peak RSS MiB"


# --------------------------------------------------------------------------------------------
# Merging.


def test_level_stats_round_trip_through_json() -> None:
    level = _level("a", 4, 120, 0.3, 10).stats
    assert stats.LevelStats.from_dict(json.loads(json.dumps(level.to_dict()))) == level


def test_merge_keeps_order_levels_and_ratios(tmp_path: Path) -> None:
    first = _run_to(tmp_path / "ours", ["ours"], concurrency=(1, 2), num_prompts=3)
    _run_to(tmp_path / "peers", ["p1", "p2"], concurrency=(1, 2), num_prompts=3)
    reports = [merge.load_report(first), merge.load_report(tmp_path / "peers")]  # file or folder
    data, results = merge.merge_reports(reports, ["ours", "peers"])
    assert [r.name for r in results] == ["ours", "p1", "p2"]
    assert [s["name"] for s in data["servers"]] == ["ours", "p1", "p2"]
    assert [r["second"] for r in data["ratios"]] == ["p1", "p2"]
    assert {r["first"] for r in data["ratios"]} == {"ours"}
    assert [s["source"] for s in data["sources"]] == ["ours", "peers"]
    original = json.loads(first.read_text())["servers"][0]["levels"]
    assert json.loads(json.dumps(data))["servers"][0]["levels"] == original
    assert results[1].level(2) is not None and results[1].level(2).stats.total_output_tokens == 12


def test_merge_rejects_duplicate_names_and_non_reports(tmp_path: Path) -> None:
    path = _run_to(tmp_path / "a", ["a"], concurrency=(1,), num_prompts=1)
    with pytest.raises(merge.MergeError, match="must differ"):
        merge.merge_reports([merge.load_report(path)] * 2)
    (tmp_path / "bad.json").write_text('{"hello": 1}')
    with pytest.raises(merge.MergeError, match="not a benchmark report"):
        merge.load_report(tmp_path / "bad.json")
    with pytest.raises(merge.MergeError):
        merge.load_report(tmp_path / "missing.json")


def test_merge_keeps_extra_server_fields(tmp_path: Path) -> None:
    path = _run_to(tmp_path / "a", ["a"], concurrency=(1,), num_prompts=1)
    data = json.loads(path.read_text())
    data["servers"][0]["command"] = "a --flag"
    merged, _ = merge.merge_reports([data])
    assert merged["servers"][0]["command"] == "a --flag"


def test_merge_command_prints_and_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _run_to(tmp_path / "a", ["a"], concurrency=(1, 2), num_prompts=2)
    b = _run_to(tmp_path / "b", ["b"], concurrency=(1, 2), num_prompts=2)
    assert cli.main(["merge", str(a), str(b), "--out-dir", str(tmp_path / "all")]) == 0
    out = capsys.readouterr().out
    assert "out tok/s" in out and "ratios a / b" in out
    data = json.loads((tmp_path / "all" / report.JSON_NAME).read_text())
    assert [s["name"] for s in data["servers"]] == ["a", "b"]
    assert cli.main(["merge", str(a), str(a)]) == 1
    assert "must differ" in capsys.readouterr().err
