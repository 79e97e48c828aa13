"""`tgserve benchmark-shard` on a tiny random model: it starts a real shard, measures every batch
size over gRPC and reports the right counts. No timing assertions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tgserve.benchmark.shard import cli


def test_shard_benchmark_end_to_end(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "shard.json"
    argv = ["--model-id", str(tiny_model_dir), "--kv-cache-memory", "16MiB", "--threads", "1"]
    argv += ["--kv-cache-dtype", "float16"]  # as `make bench` serves: the shard takes the flag
    argv += ["--batch-sizes", "1,3", "--prompt-length", "7", "--decode-steps", "4"]
    argv += ["--runs", "2", "--warmup-runs", "1", "--out", str(out)]
    assert cli.main(argv) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{tiny_model_dir}: llama float32 on cpu, prompt 7 tokens")
    assert lines[1].split()[:2] == ["batch", "prefill"]
    assert [line.split()[0] for line in lines[3:5]] == ["1", "3"]

    data = json.loads(out.read_text())
    assert data["config"]["batch_sizes"] == [1, 3]
    assert data["shard"]["model_type"] == "llama" and data["shard"]["vocab_size"] == 512
    assert data["shard"]["kv_capacity_tokens"] > 0
    for entry, size in zip(data["batch_sizes"], [1, 3], strict=True):
        assert entry["batch_size"] == size and entry["prompt_length"] == 7
        assert entry["runs"] == 2 and entry["num_prefills"] == 2
        assert entry["num_decode_steps"] == 2 * 4
        # Each run: one token from Prefill and one per Decode step, for every request.
        assert entry["generated_tokens"] == 2 * size * (1 + 4)
        assert entry["prefill_s"]["count"] == 2 and entry["decode_step_s"]["count"] == 8
        assert entry["prefill_forward_s"]["count"] == 2
        assert entry["prefill_tokens_per_s"] > 0 and entry["decode_tokens_per_s"] > 0
    # The shard is gone with its socket.
    assert not [p for p in os.listdir("/tmp") if p.startswith(f"tgserve-shard-bench-{os.getpid()}")]


def test_shard_benchmark_reports_a_kv_cache_too_small(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model-id", str(tiny_model_dir), "--kv-cache-memory", "64KiB", "--threads", "1"]
    argv += ["--batch-sizes", "64", "--prompt-length", "100", "--decode-steps", "1"]
    assert cli.main(argv) == 1
    assert "tgserve benchmark-shard:" in capsys.readouterr().err
