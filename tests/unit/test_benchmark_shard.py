"""The shard microbenchmark against a fake shard: batches it builds, calls it makes, counts."""

from __future__ import annotations

import ast
import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tgserve.benchmark import cli as load_cli
from tgserve.benchmark.shard import cli, measure
from tgserve.benchmark.shard.measure import ShardBenchConfig, ShardBenchError
from tgserve.pb import generate_pb2 as pb


@dataclass
class Timings:
    forward_ns: int = 1_000_000


@dataclass
class Step:
    generations: list[pb.Generation]
    batch: pb.CachedBatch | None
    timings: Timings = field(default_factory=Timings)


@dataclass
class FakeShard:
    """Generates one token per live request and step; a request ends after max_new_tokens."""

    capacity: int = 10_000
    calls: list[str] = field(default_factory=list)
    batches: dict[int, dict[int, int]] = field(default_factory=dict)  # id -> request -> left
    drop_one: bool = False

    async def clear_cache(self, batch_id: int | None = None) -> None:
        self.calls.append(f"clear:{batch_id}")
        if batch_id is None:
            self.batches.clear()
        else:
            self.batches.pop(batch_id, None)

    async def info(self) -> pb.InfoResponse:
        self.calls.append("info")
        return pb.InfoResponse(block_size=4, vocab_size=1000, model_type="llama", dtype="float32")

    async def warmup(self, batch: pb.Batch, *limits: Any) -> pb.WarmupResponse:
        self.calls.append(f"warmup:{len(batch.requests)}")
        return pb.WarmupResponse(max_supported_total_tokens=self.capacity)

    async def prefill(self, batch: pb.Batch) -> Step:
        self.calls.append(f"prefill:{len(batch.requests)}")
        left = {r.id: r.stopping_parameters.max_new_tokens for r in batch.requests}
        self.batches[batch.id] = left
        return self._step(batch.id)

    async def decode(self, batches: Sequence[pb.CachedBatch]) -> Step:
        self.calls.append("decode")
        return self._step(batches[0].id)

    def _step(self, batch_id: int) -> Step:
        left = self.batches[batch_id]
        ids = list(left)[: len(left) - 1] if self.drop_one else list(left)
        generations = [pb.Generation(request_id=i, tokens=pb.Tokens(ids=[5])) for i in ids]
        for i in left:
            left[i] -= 1
        live = [i for i, n in left.items() if n > 0]
        if not live:
            del self.batches[batch_id]
            return Step(generations, None)
        return Step(generations, pb.CachedBatch(id=batch_id, request_ids=live, size=len(live)))


def _run(shard: FakeShard, config: ShardBenchConfig) -> list[measure.BatchSizeResult]:
    async def go() -> list[measure.BatchSizeResult]:
        description = await measure.warm_up(shard, config)
        return await measure.measure(shard, config, description)

    return asyncio.run(go())


def test_batches_own_disjoint_blocks_after_block_zero() -> None:
    config = ShardBenchConfig(batch_sizes=(3,), prompt_length=6, decode_steps=3)
    prompts = measure.prompt_ids(config, 1000, 3)
    batch = measure.make_batch(7, prompts, config, block_size=4)
    assert batch.id == 7 and batch.size == 3 and batch.max_blocks == 3
    assert [list(r.input_ids) for r in batch.requests] == prompts
    blocks = [b for r in batch.requests for b in r.blocks]
    assert 0 not in blocks and len(set(blocks)) == len(blocks) == 9
    for r in batch.requests:
        assert len(r.slots) == 6 + 4 - 1  # the last generated token needs no slot
        assert {s // 4 for s in r.slots} <= set(r.blocks)
        assert r.stopping_parameters.max_new_tokens == 4 and r.stopping_parameters.ignore_eos_token
        assert not r.parameters.do_sample
    assert measure.blocks_needed(config, 4) == 1 + 3 * 3


def test_prompt_ids_are_deterministic_and_in_the_vocabulary() -> None:
    config = ShardBenchConfig(prompt_length=50)
    first = measure.prompt_ids(config, 300, 4)
    assert first == measure.prompt_ids(config, 300, 4)
    assert all(75 <= t < 300 for ids in first for t in ids)
    assert len({tuple(ids) for ids in first}) == 4


def test_measure_makes_the_calls_of_each_run_and_counts_them() -> None:
    shard = FakeShard()
    config = ShardBenchConfig(batch_sizes=(1, 2), prompt_length=5, decode_steps=2, runs=2)
    results = _run(shard, config)

    def one_run(n: int) -> list[str]:
        return [f"prefill:{n}", "decode", "decode"]

    assert shard.calls[:3] == ["clear:None", "info", "warmup:2"]
    assert shard.calls[3:] == [
        *one_run(1), "clear:1", *one_run(1), "clear:2", *one_run(1), "clear:3",
        *one_run(2), "clear:4", *one_run(2), "clear:5", *one_run(2), "clear:6",
    ]  # fmt: skip
    assert [r.batch_size for r in results] == [1, 2]
    for r in results:
        assert r.runs == 2 and len(r.prefill_s) == 2 and len(r.decode_s) == 4
        assert r.generated_tokens == 2 * r.batch_size * 3
        data = r.to_dict()
        assert data["num_decode_steps"] == 4 and data["decode_forward_s"]["p50"] == 0.001
        assert r.decode_tokens_per_s and r.prefill_tokens_per_s


def test_zero_decode_steps_measures_prefill_only() -> None:
    results = _run(FakeShard(), ShardBenchConfig(batch_sizes=(2,), decode_steps=0, runs=1))
    assert len(results[0].prefill_s) == 1 and results[0].decode is None
    assert results[0].decode_tokens_per_s is None and results[0].generated_tokens == 2


def test_wrong_counts_and_small_caches_are_errors() -> None:
    with pytest.raises(ShardBenchError, match="generations"):
        _run(FakeShard(drop_one=True), ShardBenchConfig(batch_sizes=(2,), runs=1))
    with pytest.raises(ShardBenchError, match="KV cache holds"):
        _run(FakeShard(capacity=64), ShardBenchConfig(batch_sizes=(4,), prompt_length=100))
    with pytest.raises(ValueError):
        ShardBenchConfig(batch_sizes=())
    with pytest.raises(ValueError):
        ShardBenchConfig(runs=0)


def test_table_has_a_row_per_batch_size() -> None:
    results = _run(FakeShard(), ShardBenchConfig(batch_sizes=(1, 4), decode_steps=1, runs=1))
    lines = cli.format_table(results).splitlines()
    assert len(lines) == 2 + 2
    assert lines[0].split()[:3] == ["batch", "prefill", "ms"]
    assert lines[3].split()[0] == "4" and lines[3].split()[-1] == str(4 * 2)


def test_load_generator_does_not_import_the_shard_benchmark() -> None:
    """`tgserve benchmark` stays free of server internals; only the shard subpackage has them."""
    package = Path(load_cli.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("tgserve.benchmark.shard"), path.name
