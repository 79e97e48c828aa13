"""ShardClient against two in-process grpc.aio ranks on unix sockets: fan-out and merging; the
conversions between the core's batch types and protobuf."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from tgserve.pb import generate_pb2 as pb
from tgserve.pb import generate_pb2_grpc
from tgserve.router.core.batch import Batch, BatchRequest, CachedBatch, generation_events
from tgserve.router.core.blocks import BlockAllocation
from tgserve.router.errors import error_info
from tgserve.router.shard_client import (
    CoreShardClient,
    ShardClient,
    open_channel,
    to_cached_batch,
    to_generation,
    to_pb_cached_batch,
)
from tgserve.router.types import (
    EndEvent,
    FinishReason,
    GenerationError,
    PrefillEvent,
    SamplingParameters,
    StoppingParameters,
    TokenEvent,
    ValidRequest,
)


class FakeRank(generate_pb2_grpc.TextGenerationServiceServicer):
    """Answers for the requests whose id % world_size == rank, like a real shard."""

    def __init__(self, rank: int, urls: list[str]) -> None:
        self.rank = rank
        self.urls = urls
        self.calls: list[tuple[str, Any]] = []
        self.fail_decode = False

    async def ServiceDiscovery(self, request: Any, context: Any) -> pb.ServiceDiscoveryResponse:
        return pb.ServiceDiscoveryResponse(urls=self.urls)

    async def Info(self, request: Any, context: Any) -> pb.InfoResponse:
        self.calls.append(("info", None))
        return pb.InfoResponse(block_size=16, model_type="llama", device_type=f"cpu{self.rank}")

    async def Health(self, request: Any, context: Any) -> pb.HealthResponse:
        self.calls.append(("health", None))
        return pb.HealthResponse()

    async def ClearCache(self, request: pb.ClearCacheRequest, context: Any) -> Any:
        self.calls.append(("clear", request.id if request.HasField("id") else None))
        return pb.ClearCacheResponse()

    async def FilterBatch(self, request: pb.FilterBatchRequest, context: Any) -> Any:
        self.calls.append(("filter", (request.batch_id, list(request.request_ids))))
        batch = pb.CachedBatch(id=request.batch_id, request_ids=request.request_ids,
                               size=len(request.request_ids))
        return pb.FilterBatchResponse(batch=batch)

    async def Warmup(self, request: pb.WarmupRequest, context: Any) -> pb.WarmupResponse:
        self.calls.append(("warmup", len(request.batch.requests)))
        # Rank 1 has less memory than rank 0.
        return pb.WarmupResponse(max_supported_total_tokens=[5000, 3000][self.rank],
                                 max_input_tokens=[1000, 900][self.rank],
                                 max_total_tokens=[2000, 2048][self.rank])

    def _answer(self, ids: list[int], batch_id: int) -> dict[str, Any]:
        mine = [i for i in ids if i % len(self.urls) == self.rank]
        generations = [
            pb.Generation(request_id=i, tokens=pb.Tokens(ids=[100 + i], logprobs=[-0.1],
                                                         texts=[f"r{self.rank}"],
                                                         is_special=[False]))
            for i in mine
        ]
        return dict(
            generations=generations,
            batch=pb.CachedBatch(id=batch_id, request_ids=ids, size=len(ids)),
            forward_ns=[10, 30][self.rank],
            decode_ns=[7, 2][self.rank],
            total_ns=[20, 40][self.rank],
        )

    async def Prefill(self, request: pb.PrefillRequest, context: Any) -> pb.PrefillResponse:
        self.calls.append(("prefill", request.batch.id))
        ids = [r.id for r in request.batch.requests]
        return pb.PrefillResponse(**self._answer(ids, request.batch.id))

    async def Decode(self, request: pb.DecodeRequest, context: Any) -> pb.DecodeResponse:
        self.calls.append(("decode", request.batches[0].id))
        if self.fail_decode:
            await context.abort(grpc.StatusCode.INTERNAL, f"rank {self.rank} exploded")
        ids = [i for b in request.batches for i in b.request_ids]
        return pb.DecodeResponse(**self._answer(ids, request.batches[0].id), concat_ns=5)


class StreamingRank(FakeRank):
    """A rank that also serves DecodeStream, as tgserve's shards do."""

    async def DecodeStream(self, request_iterator: Any, context: Any) -> Any:
        self.calls.append(("stream", None))
        async for request in request_iterator:
            self.calls.append(("streamed", request.batches[0].id))
            yield await self.Decode(request, context)


@asynccontextmanager
async def two_ranks(
    tmp_path: Path, rank_types: tuple[type[FakeRank], ...] = (FakeRank, FakeRank)
) -> AsyncIterator[tuple[ShardClient, list[FakeRank]]]:
    """Two ranks serving on unix sockets and a client connected through rank 0's discovery."""
    urls = [f"unix://{tmp_path}/shard-{rank}" for rank in range(2)]
    servers, ranks = [], []
    for rank, url in enumerate(urls):
        server = grpc.aio.server()
        servicer = rank_types[rank](rank, urls)
        generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(servicer, server)
        server.add_insecure_port(url)
        await server.start()
        servers.append(server)
        ranks.append(servicer)
    client = await ShardClient.connect(str(tmp_path / "shard-0"))
    try:
        yield client, ranks
    finally:
        await client.close()
        for server in servers:
            await server.stop(None)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def test_an_unreachable_shard_is_named_to_clients_without_its_socket_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """gRPC's own details name the socket path (`unix:/tmp/...: No such file or directory`):
    the router's log keeps them, the 424 body does not."""
    socket_path = str(tmp_path / "gone-0")

    async def main() -> GenerationError:
        client = ShardClient([open_channel(socket_path)])
        try:
            with pytest.raises(GenerationError) as failed:
                await client.health()
        finally:
            await client.close()
        return failed.value

    with caplog.at_level(logging.ERROR, logger="tgserve.router.shard_client"):
        error = run(main())
    assert isinstance(error.__cause__, grpc.aio.AioRpcError)
    assert error.__cause__.code() == grpc.StatusCode.UNAVAILABLE
    assert socket_path in caplog.text and "UNAVAILABLE" in caplog.text
    info = error_info(error)
    body = json.dumps(info.body())
    assert info.status == 424 and "unix:" not in body and str(tmp_path) not in body
    assert info.body() == {"error": "Request failed during generation: "
                                    "the model shard is unreachable", "error_type": "generation"}


def test_two_ranks_fan_out_and_merge(tmp_path: Path) -> None:
    async def main() -> None:
        async with two_ranks(tmp_path) as (client, ranks):
            assert client.world_size == 2
            assert (await client.info()).device_type == "cpu1"  # the last rank's answer
            await client.health()
            await client.clear_cache(None)
            await client.clear_cache(7)
            warm = await client.warmup(pb.Batch(id=0, requests=[pb.Request(id=0)]), None, 64, None)
            assert warm.max_supported_total_tokens == 3000
            assert (warm.max_input_tokens, warm.max_total_tokens) == (900, 2000)

            batch = pb.Batch(id=3, requests=[pb.Request(id=i) for i in range(4)], size=4)
            result = await client.prefill(batch)
            assert sorted(g.request_id for g in result.generations) == [0, 1, 2, 3]
            texts = {g.request_id: g.tokens.texts[0] for g in result.generations}
            assert texts == {0: "r0", 1: "r1", 2: "r0", 3: "r1"}
            assert result.batch is not None and list(result.batch.request_ids) == [0, 1, 2, 3]
            # Timings come from the slowest shard.
            assert (result.timings.forward_ns, result.timings.total_ns) == (30, 40)
            assert result.timings.decode_ns == 7 and result.timings.concat_ns is None

            decoded = await client.decode([result.batch])
            assert len(decoded.generations) == 4 and decoded.timings.concat_ns == 5
            kept = await client.filter_batch(3, [1, 2])
            assert list(kept.request_ids) == [1, 2]
            for rank in ranks:
                assert ("clear", None) in rank.calls and ("clear", 7) in rank.calls
                assert ("filter", (3, [1, 2])) in rank.calls
                assert ("warmup", 1) in rank.calls and ("health", None) in rank.calls

            ranks[1].fail_decode = True
            with pytest.raises(GenerationError, match="rank 1 exploded"):
                await client.decode([result.batch])
            # These ranks have no DecodeStream: the client fell back to unary calls. (Rank 1's
            # record: the failed call returns once rank 1 has answered, not rank 0.)
            assert [c for c in ranks[1].calls if c[0] == "decode"] == [("decode", 3)] * 2

    run(main())


def test_decode_steps_share_one_stream_per_rank(tmp_path: Path) -> None:
    async def main() -> None:
        async with two_ranks(tmp_path, (StreamingRank, StreamingRank)) as (client, ranks):
            batch = pb.CachedBatch(id=5, request_ids=[0, 1, 2], size=3)
            for _ in range(3):
                decoded = await client.decode([batch])
                assert sorted(g.request_id for g in decoded.generations) == [0, 1, 2]
                assert decoded.timings.concat_ns == 5
            for rank in ranks:
                assert rank.calls == [("stream", None)] + [("streamed", 5), ("decode", 5)] * 3

            # A failed step ends the stream with the shard's message; the next opens another.
            ranks[1].fail_decode = True
            with pytest.raises(GenerationError, match="rank 1 exploded"):
                await client.decode([batch])
            ranks[1].fail_decode = False
            assert len((await client.decode([batch])).generations) == 3
            assert ranks[1].calls.count(("stream", None)) == 2

            # A traced step carries its parent span in the call's metadata: a unary call.
            before = list(ranks[0].calls)
            await client.decode([batch], metadata=(("traceparent", "00-" + "1" * 32 + "-"
                                                    + "2" * 16 + "-01"),))
            assert ranks[0].calls == before + [("decode", 5)]

    run(main())


def test_a_step_that_one_rank_streamed_is_not_sent_again(tmp_path: Path) -> None:
    """Rank 0 has DecodeStream and ran the step; rank 1 has not: a unary retry would run the
    step twice on rank 0, so the step fails, and the next ones go as unary calls to both."""

    async def main() -> None:
        async with two_ranks(tmp_path, (StreamingRank, FakeRank)) as (client, ranks):
            batch = pb.CachedBatch(id=5, request_ids=[0, 1], size=2)
            with pytest.raises(GenerationError):
                await client.decode([batch])
            assert ranks[0].calls.count(("decode", 5)) == 1
            assert len((await client.decode([batch])).generations) == 2
            assert ranks[0].calls.count(("streamed", 5)) == 1  # the second went unary

    run(main())


def test_generation_events_split_tokens_and_finish() -> None:
    generation = pb.Generation(
        request_id=1,
        prefill_tokens=pb.Tokens(ids=[5, 6], logprobs=[math.nan, -2.0], texts=["a", "b"],
                                 is_special=[True, False]),
        tokens=pb.Tokens(ids=[7, 8], logprobs=[-0.5, -0.25], texts=["c", "d"],
                         is_special=[False, False]),
        top_tokens=[pb.Tokens(ids=[7, 9], logprobs=[-0.5, -1.0], texts=["c", "x"],
                              is_special=[False, False]),
                    pb.Tokens(ids=[8], logprobs=[-0.25], texts=["d"], is_special=[False])],
        generated_text=pb.GeneratedText(text="cd", generated_tokens=2,
                                        finish_reason=pb.FINISH_REASON_STOP_SEQUENCE),
    )
    events = generation_events(to_generation(generation), True, queued_at=1.0, started_at=2.0)
    assert [type(e) for e in events] == [PrefillEvent, TokenEvent, EndEvent]
    prefill, first, end = events
    assert isinstance(prefill, PrefillEvent) and prefill.tokens[0].logprob is None
    assert prefill.tokens[0].special and prefill.tokens[1].logprob == -2.0
    assert isinstance(first, TokenEvent) and [t.id for t in first.top_tokens] == [7, 9]
    assert isinstance(end, EndEvent) and end.token.id == 8 and [t.id for t in end.top_tokens] == [8]
    assert end.generated_text.finish_reason is FinishReason.STOP_SEQUENCE
    assert end.generated_text.seed is None
    assert (end.queued_at, end.started_at) == (1.0, 2.0)
    without = generation_events(to_generation(generation), False, 1.0, 2.0)
    assert not any(isinstance(e, PrefillEvent) for e in without)


def test_a_generation_without_prompt_tokens_or_end() -> None:
    generation = to_generation(pb.Generation(request_id=4, tokens=pb.Tokens(ids=[9], texts=["z"])))
    assert generation.request_id == 4 and generation.generated_text is None
    assert generation.prefill_tokens == () and generation.prefill_top_tokens == ()
    (token,) = generation.tokens
    assert (token.id, token.text, token.logprob, token.special) == (9, "z", None, False)
    (event,) = generation_events(generation, True, 1.0, 2.0)
    assert isinstance(event, TokenEvent) and event.top_tokens == []


def test_cached_batch_round_trip() -> None:
    batch = CachedBatch(id=3, request_ids=(4, 5), size=2, max_tokens=40, current_tokens=12)
    wire = to_pb_cached_batch(batch)
    assert (wire.id, list(wire.request_ids), wire.size) == (3, [4, 5], 2)
    assert (wire.max_tokens, wire.current_tokens) == (40, 12)
    assert to_cached_batch(wire) == batch


def test_core_client_speaks_the_core_types(tmp_path: Path) -> None:
    request = ValidRequest(inputs="x", input_ids=(1,), parameters=SamplingParameters(),
                           stopping=StoppingParameters(max_new_tokens=2))
    allocation = BlockAllocation(0, (1,), (16, 17))
    batch = Batch(id=3, requests=[BatchRequest(i, request, allocation) for i in range(4)],
                  size=4, max_tokens=12, max_blocks=1)

    async def main() -> None:
        async with two_ranks(tmp_path) as (raw, ranks):
            client = CoreShardClient(raw)
            info = await client.info(default_block_size=8)
            assert info.block_size == 16 and info.device_type == "cpu1"
            warm = await client.warmup(batch, None, 64, None)
            assert warm.max_supported_total_tokens == 3000
            assert (warm.max_input_tokens, warm.max_total_tokens) == (900, 2000)
            assert ("warmup", 4) in ranks[0].calls

            result = await client.prefill(batch)
            assert sorted(g.request_id for g in result.generations) == [0, 1, 2, 3]
            texts = {g.request_id: g.tokens[0].text for g in result.generations}
            assert texts == {0: "r0", 1: "r1", 2: "r0", 3: "r1"}
            assert result.batch == CachedBatch(3, (0, 1, 2, 3), 4, 0)
            assert (result.timings.forward_ns, result.timings.total_ns) == (30, 40)

            decoded = await client.decode([result.batch])
            assert len(decoded.generations) == 4 and decoded.timings.concat_ns == 5
            assert isinstance(decoded.batch, CachedBatch)
            kept = await client.filter_batch(3, [1, 2])
            assert kept == CachedBatch(3, (1, 2), 2, 0)
            await client.health()
            await client.clear_cache(3)
            assert ("clear", 3) in ranks[1].calls

    run(main())
