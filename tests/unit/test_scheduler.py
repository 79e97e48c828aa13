"""Continuous batching against a fake shard: joins, leaves, cancellation, failures, budgets.

The fake speaks the gRPC contract's messages; CoreShardClient converts between them and the
core's batch types, as it does in the server.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from tgserve.pb import generate_pb2 as pb
from tgserve.router.core.batch import ShardTimings
from tgserve.router.core.scheduler import (
    QUEUE_DRAIN_STEPS,
    U64_MAX,
    NoopObserver,
    Scheduler,
    SchedulerSettings,
    step_prefill_budget,
)
from tgserve.router.core.warmup import (
    StartupError,
    connect_and_warmup,
    resolve_limits,
    resolve_settings,
)
from tgserve.router.shard_client import CoreShardClient, ShardStep, shard_info, to_warmup_result
from tgserve.router.types import (
    EndEvent,
    FinishReason,
    GenerationError,
    InferEvent,
    PrefillEvent,
    SamplingParameters,
    StoppingParameters,
    TokenEvent,
    ValidRequest,
)

TIMINGS = ShardTimings(forward_ns=1, decode_ns=1, total_ns=2)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


@dataclass
class FakeRequest:
    id: int
    max_new_tokens: int
    slots: list[int]
    generated: int = 0


@dataclass
class FakeShardClient:
    """One token per request per step; a request ends after its max_new_tokens.

    It checks what a real KV cache would need: no two live requests ever share a slot, and
    every slot lies inside the cache.
    """

    num_slots: int
    calls: list[tuple[str, Any]] = field(default_factory=list)
    batches: dict[int, list[FakeRequest]] = field(default_factory=dict)
    fail: Callable[[str, list[int]], Exception | None] = lambda method, ids: None
    healthy: bool = True
    # Per Prefill and Decode, in call order: whether it let the shard decode ahead.
    aheads: list[bool] = field(default_factory=list)

    async def _yield(self) -> None:
        # Give consumers (and newly arriving requests) a chance to run mid-step.
        for _ in range(5):
            await asyncio.sleep(0)

    def live_slots(self) -> list[int]:
        return [s for reqs in self.batches.values() for r in reqs for s in r.slots]

    async def health(self) -> None:
        self.calls.append(("health", None))
        if not self.healthy:
            raise GenerationError("device gone")

    async def clear_cache(self, batch_id: int | None = None) -> None:
        self.calls.append(("clear", batch_id))
        if batch_id is None:
            self.batches.clear()
        else:
            self.batches.pop(batch_id, None)

    async def filter_batch(self, batch_id: int, request_ids: Sequence[int]) -> pb.CachedBatch:
        self.calls.append(("filter", (batch_id, sorted(request_ids))))
        keep = set(request_ids)
        self.batches[batch_id] = [r for r in self.batches[batch_id] if r.id in keep]
        return self._cached(batch_id)

    async def prefill(
        self, batch: pb.Batch, cached_batch: pb.CachedBatch | None = None,
        metadata: Any = None, decode_ahead: bool = False,
    ) -> ShardStep:
        ids = [r.id for r in batch.requests]
        self.calls.append(("prefill", (batch.id, ids)))
        self.aheads.append(decode_ahead)
        await self._yield()
        if (err := self.fail("prefill", ids)) is not None:
            raise err
        live = set(self.live_slots())
        requests = []
        for r in batch.requests:
            assert len(r.slots) == len(r.input_ids) + r.stopping_parameters.max_new_tokens - 1
            assert live.isdisjoint(r.slots), "two live requests share a KV slot"
            assert all(0 <= s < self.num_slots for s in r.slots)
            live.update(r.slots)
            requests.append(FakeRequest(r.id, r.stopping_parameters.max_new_tokens, list(r.slots)))
        prefill_logprobs = {r.id for r in batch.requests if r.prefill_logprobs}
        if cached_batch is not None:
            # Mixed prefill: the running batch advances in the same step and the newcomers join it.
            running = self.batches.pop(cached_batch.id)
            return self._step(cached_batch.id, running + requests, prefill_logprobs)
        return self._step(batch.id, requests, prefill_logprobs)

    async def decode(
        self, batches: Sequence[pb.CachedBatch], metadata: Any = None, decode_ahead: bool = False
    ) -> ShardStep:
        requests = [r for b in batches for r in self.batches.pop(b.id)]
        ids = [r.id for r in requests]
        self.calls.append(("decode", ids))
        self.aheads.append(decode_ahead)
        await self._yield()
        if (err := self.fail("decode", ids)) is not None:
            raise err
        return self._step(batches[0].id, requests, set())

    def _step(self, batch_id: int, requests: list[FakeRequest], prefill: set[int]) -> ShardStep:
        generations = []
        for r in requests:
            r.generated += 1
            token_id = 1000 + r.generated
            g = pb.Generation(
                request_id=r.id,
                tokens=pb.Tokens(ids=[token_id], logprobs=[-0.5], texts=[f"t{r.generated}"],
                                 is_special=[False]),
            )
            if r.id in prefill:
                g.prefill_tokens.CopyFrom(pb.Tokens(ids=[1, 2], logprobs=[float("nan"), -1.0],
                                                    texts=["a", "b"], is_special=[False] * 2))
            if r.generated == r.max_new_tokens:
                g.generated_text.CopyFrom(pb.GeneratedText(
                    text="".join(f"t{i}" for i in range(1, r.generated + 1)),
                    generated_tokens=r.generated,
                    finish_reason=pb.FINISH_REASON_LENGTH, seed=3))
            generations.append(g)
        remaining = [r for r in requests if r.generated < r.max_new_tokens]
        if not remaining:
            return ShardStep(generations, None, TIMINGS)
        self.batches[batch_id] = remaining
        return ShardStep(generations, self._cached(batch_id), TIMINGS)

    def _cached(self, batch_id: int) -> pb.CachedBatch:
        reqs = self.batches[batch_id]
        return pb.CachedBatch(id=batch_id, request_ids=[r.id for r in reqs], size=len(reqs),
                              max_tokens=sum(len(r.slots) for r in reqs))

    def decodes(self) -> list[list[int]]:
        return [ids for name, ids in self.calls if name == "decode"]

    def prefills(self) -> list[list[int]]:
        return [ids for name, (_, ids) in ((n, a) for n, a in self.calls if n == "prefill")]


class RecordingObserver(NoopObserver):
    def __init__(self) -> None:
        self.concats: list[str] = []
        self.blocks: list[tuple[int, int]] = []
        self.dropped = 0
        self.failures: list[str] = []

    def on_concat(self, reason: str) -> None:
        self.concats.append(reason)

    def on_blocks(self, used: int, total: int) -> None:
        assert used <= total
        self.blocks.append((used, total))

    def on_request_dropped(self) -> None:
        self.dropped += 1

    def on_inference_failure(self, method: str) -> None:
        self.failures.append(method)


def req(input_length: int, max_new_tokens: int, details: bool = False) -> ValidRequest:
    return ValidRequest(
        inputs="p" * input_length,
        input_ids=tuple(range(1, input_length + 1)),
        parameters=SamplingParameters(),
        stopping=StoppingParameters(max_new_tokens=max_new_tokens),
        decoder_input_details=details,
    )


def make(
    num_blocks: int = 64, block_size: int = 4, observer: RecordingObserver | None = None,
    mixed_prefill: bool = False, **kw: Any
) -> tuple[Scheduler, FakeShardClient]:
    settings = SchedulerSettings(
        max_batch_prefill_tokens=kw.pop("max_batch_prefill_tokens", 64),
        max_batch_total_tokens=num_blocks * block_size,
        block_size=block_size,
        **kw,
    )
    client = FakeShardClient(num_slots=num_blocks * block_size)
    backend = CoreShardClient(client)  # type: ignore[arg-type]
    return Scheduler(backend, settings, observer, mixed_prefill=mixed_prefill), client


async def collect(stream: AsyncIterator[InferEvent], log: list[tuple[str, Any]] | None = None,
                  name: str = "") -> list[InferEvent]:
    events = []
    async for event in stream:
        events.append(event)
        if log is not None and isinstance(event, EndEvent):
            log.append(("end", name))
    return events


async def wait_until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0)


# ---- events ------------------------------------------------------------------------------


def test_one_request_streams_tokens_then_end() -> None:
    async def main() -> None:
        scheduler, client = make()
        scheduler.start()
        events = await collect(scheduler.schedule(req(5, 3, details=True)))
        await scheduler.stop()
        assert isinstance(events[0], PrefillEvent)
        assert [t.logprob for t in events[0].tokens] == [None, -1.0]  # NaN becomes None
        assert [type(e) for e in events[1:]] == [TokenEvent, TokenEvent, EndEvent]
        end = events[-1]
        assert isinstance(end, EndEvent)
        assert end.generated_text.text == "t1t2t3"
        assert end.generated_text.finish_reason is FinishReason.LENGTH
        assert end.generated_text.seed == 3
        assert end.started_at >= end.queued_at
        assert scheduler.allocator.used_blocks == 0
        assert ("clear", None) not in client.calls

    run(main())


def test_prefill_event_only_with_decoder_input_details() -> None:
    async def main() -> None:
        scheduler, _ = make()
        scheduler.start()
        events = await collect(scheduler.schedule(req(5, 2)))
        await scheduler.stop()
        assert [type(e) for e in events] == [TokenEvent, EndEvent]

    run(main())


# ---- continuous batching -----------------------------------------------------------------


def test_short_request_joins_a_running_long_one_and_finishes_first() -> None:
    async def main() -> None:
        scheduler, client = make(waiting_served_ratio=0.3)
        scheduler.start()
        order: list[tuple[str, Any]] = []
        long_task = asyncio.create_task(collect(scheduler.schedule(req(4, 30)), order, "long"))
        await wait_until(lambda: len(client.decodes()) >= 2)
        short = await collect(scheduler.schedule(req(3, 3)), order, "short")
        long = await long_task
        await scheduler.stop()
        assert order == [("end", "short"), ("end", "long")]
        assert len(short) == 3 and len(long) == 30
        long_id, short_id = client.prefills()[0][0], client.prefills()[1][0]
        assert any({long_id, short_id} <= set(ids) for ids in client.decodes())
        assert scheduler.allocator.used_blocks == 0

    run(main())


def test_max_batch_size_keeps_newcomers_waiting() -> None:
    async def main() -> None:
        scheduler, client = make(max_batch_size=1)
        scheduler.start()
        first = asyncio.create_task(collect(scheduler.schedule(req(4, 6))))
        await wait_until(lambda: len(client.decodes()) >= 1)
        second = await collect(scheduler.schedule(req(4, 2)))
        await first
        await scheduler.stop()
        assert len(second) == 2
        assert all(len(ids) == 1 for ids in client.decodes())

    run(main())


def test_newcomer_waits_for_max_waiting_tokens_when_too_few_wait() -> None:
    async def main() -> None:
        observer = RecordingObserver()
        scheduler, client = make(observer=observer, waiting_served_ratio=1.0,
                                 max_waiting_tokens=5)
        a = scheduler.schedule(req(4, 40))
        b = scheduler.schedule(req(4, 40))
        tasks = [asyncio.create_task(collect(s)) for s in (a, b)]
        await asyncio.sleep(0)  # both queued before the batching task starts
        scheduler.start()
        await wait_until(lambda: len(client.decodes()) >= 1)
        late = asyncio.create_task(collect(scheduler.schedule(req(4, 2))))
        await asyncio.gather(late, *tasks)
        await scheduler.stop()
        # Batch of 2 with ratio 1.0 needs 2 waiting; one alone joins only once
        # waiting_tokens (1 after prefill, +1 per decode) reaches 5, i.e. after 4 decodes.
        assert observer.concats == ["wait_exceeded"]
        prefill_index = [i for i, (n, _) in enumerate(client.calls) if n == "prefill"][1]
        decodes_before = [c for c in client.calls[:prefill_index] if c[0] == "decode"]
        assert len(decodes_before) == 4

    run(main())


def test_enough_waiting_requests_join_at_once_as_backpressure() -> None:
    async def main() -> None:
        observer = RecordingObserver()
        scheduler, client = make(observer=observer, waiting_served_ratio=1.0,
                                 max_waiting_tokens=1000)
        firsts = [asyncio.create_task(collect(scheduler.schedule(req(4, 20)))) for _ in range(2)]
        await asyncio.sleep(0)
        scheduler.start()
        await wait_until(lambda: len(client.decodes()) >= 1)
        lates = [asyncio.create_task(collect(scheduler.schedule(req(4, 2)))) for _ in range(2)]
        await asyncio.gather(*firsts, *lates)
        await scheduler.stop()
        assert observer.concats == ["backpressure"]
        prefills = client.prefills()
        assert len(prefills) == 2 and len(prefills[1]) == 2
        # The pair joined long before max_waiting_tokens could have forced it.
        prefill_index = [i for i, (n, _) in enumerate(client.calls) if n == "prefill"][1]
        assert len([c for c in client.calls[:prefill_index] if c[0] == "decode"]) < 5

    run(main())


# ---- cancellation ------------------------------------------------------------------------


def test_closed_stream_is_filtered_out_and_freed_within_one_step() -> None:
    async def main() -> None:
        observer = RecordingObserver()
        scheduler, client = make(observer=observer)
        keep = asyncio.create_task(collect(scheduler.schedule(req(4, 20))))
        gone = scheduler.schedule(req(9, 20))
        await asyncio.sleep(0)
        scheduler.start()
        received = 0
        async for _ in gone:
            received += 1
            if received == 3:
                break
        blocks_before = scheduler.allocator.used_blocks
        await gone.aclose()
        decodes_at_close = len(client.decodes())
        await wait_until(lambda: any(n == "filter" for n, _ in client.calls))
        (kept_id, gone_id) = client.prefills()[0]
        filters = [args for n, args in client.calls if n == "filter"]
        assert filters[0][1] == [kept_id]
        with_gone = [ids for ids in client.decodes()[decodes_at_close:] if gone_id in ids]
        assert len(with_gone) <= 1  # at most the step already in flight
        assert scheduler.allocator.used_blocks == blocks_before - 7  # 9+20-1 tokens = 7 blocks
        await keep
        await scheduler.stop()
        assert observer.dropped == 1
        assert scheduler.allocator.used_blocks == 0

    run(main())


def test_cancelled_while_queued_never_reaches_the_shard() -> None:
    async def main() -> None:
        observer = RecordingObserver()
        scheduler, client = make(observer=observer)
        stream = scheduler.schedule(req(4, 3))
        waiter = asyncio.create_task(stream.__anext__())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await stream.aclose()
        scheduler.start()
        events = await collect(scheduler.schedule(req(4, 2)))
        await scheduler.stop()
        assert len(events) == 2
        assert len(client.prefills()) == 1 and len(client.prefills()[0]) == 1
        assert observer.dropped == 1

    run(main())


# ---- failures and health -----------------------------------------------------------------


def test_decode_failure_fails_its_requests_and_the_server_keeps_serving() -> None:
    async def main() -> None:
        observer = RecordingObserver()
        scheduler, client = make(observer=observer)
        failed_once: list[bool] = []

        def fail(method: str, ids: list[int]) -> Exception | None:
            if method == "decode" and len(client.decodes()) == 2 and not failed_once:
                failed_once.append(True)
                # What the shard client raises for the shard's own error: its words reach clients.
                return GenerationError("OutOfMemoryError: CUDA out of memory")
            return None

        client.fail = fail
        tasks = [asyncio.create_task(collect(scheduler.schedule(req(4, 10)))) for _ in range(2)]
        await asyncio.sleep(0)
        scheduler.start()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, GenerationError) for r in results)
        assert "CUDA out of memory" in str(results[0])
        batch_id = [a for n, a in client.calls if n == "prefill"][0][0]
        assert ("clear", batch_id) in client.calls
        assert observer.failures == ["decode"]
        assert scheduler.allocator.used_blocks == 0
        events = await collect(scheduler.schedule(req(4, 3)))
        await scheduler.stop()
        assert isinstance(events[-1], EndEvent)

    run(main())


def test_an_unexpected_step_error_reaches_clients_without_its_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        scheduler, client = make()
        client.fail = lambda method, ids: OSError("unix:/tmp/tgs-secret-0: No such file")
        scheduler.start()
        with pytest.raises(GenerationError) as failed:
            await collect(scheduler.schedule(req(4, 3)))
        await scheduler.stop()
        assert str(failed.value) == "the model shard failed"

    with caplog.at_level(logging.ERROR):
        run(main())
    assert "unix:/tmp/tgs-secret-0" in caplog.text  # the operator still reads it


def test_prefill_failure_of_a_joining_batch_spares_the_running_one() -> None:
    async def main() -> None:
        scheduler, client = make()
        client.fail = lambda method, ids: (
            GenerationError("bad prompt") if method == "prefill" and 1 in ids else None
        )
        running = asyncio.create_task(collect(scheduler.schedule(req(4, 8))))
        scheduler.start()
        await wait_until(lambda: len(client.decodes()) >= 1)
        with pytest.raises(GenerationError, match="bad prompt"):
            await collect(scheduler.schedule(req(4, 8)))
        events = await running
        await scheduler.stop()
        assert len(events) == 8
        assert scheduler.allocator.used_blocks == 0

    run(main())


def test_health_uses_rpc_then_a_real_prefill_on_block_zero_after_failure() -> None:
    async def main() -> None:
        scheduler, client = make()
        assert await scheduler.health() is True
        assert client.calls[-1] == ("health", None)
        client.fail = lambda method, ids: RuntimeError("boom") if method == "decode" else None
        scheduler.start()
        with pytest.raises(GenerationError):
            await collect(scheduler.schedule(req(4, 3)))
        client.fail = lambda method, ids: None
        calls_before = len(client.calls)
        assert await scheduler.health() is True
        name, (batch_id, ids) = client.calls[calls_before]
        assert (name, batch_id, ids) == ("prefill", U64_MAX, [U64_MAX])
        assert client.calls[-1][0] != "health"
        # Healthy again: back to the cheap RPC.
        client.healthy = False
        assert await scheduler.health() is False
        await scheduler.stop()

    run(main())


def test_request_that_can_never_fit_is_refused_not_queued_forever() -> None:
    async def main() -> None:
        scheduler, _ = make(num_blocks=4, block_size=4)  # 12 usable KV tokens
        scheduler.start()
        with pytest.raises(GenerationError, match="KV tokens"):
            await collect(scheduler.schedule(req(8, 8)))
        assert len(scheduler.queue) == 0
        await scheduler.stop()

    run(main())


def test_request_in_flight_names_the_requests_of_the_batches_on_the_shards() -> None:
    async def main() -> None:
        scheduler, client = make()
        seen: list[tuple[int, ValidRequest | None]] = []
        original_decode = client.decode

        async def looking_decode(batches: Sequence[pb.CachedBatch], metadata: Any = None,
                                 decode_ahead: bool = False) -> Any:
            seen.extend((i, scheduler.request_in_flight(i)) for b in batches
                        for i in b.request_ids)
            return await original_decode(batches, metadata, decode_ahead)

        client.decode = looking_decode  # type: ignore[method-assign]
        r = req(4, 3)
        scheduler.start()
        await collect(scheduler.schedule(r))
        await scheduler.stop()
        assert seen and all(request is r for _, request in seen)
        assert scheduler.request_in_flight(seen[0][0]) is None  # finished
        assert scheduler.request_in_flight(U64_MAX) is None

    run(main())


def test_stop_fails_waiting_requests() -> None:
    async def main() -> None:
        scheduler, _ = make()
        task = asyncio.create_task(collect(scheduler.schedule(req(4, 3))))
        await asyncio.sleep(0)
        await scheduler.stop()
        with pytest.raises(GenerationError, match="shutting down"):
            await task

    run(main())


def test_stop_fails_running_requests_and_frees_their_blocks() -> None:
    async def main() -> None:
        scheduler, client = make()
        scheduler.start()
        task = asyncio.create_task(collect(scheduler.schedule(req(4, 50))))
        await wait_until(lambda: len(client.decodes()) >= 2)
        assert scheduler.allocator.used_blocks > 0
        await scheduler.stop()
        with pytest.raises(GenerationError, match="shutting down"):
            await task
        assert scheduler.allocator.used_blocks == 0

    run(main())


# ---- invariants under random load --------------------------------------------------------


def test_blocks_never_over_committed_under_random_load() -> None:
    async def consumer(scheduler: Scheduler, rng: random.Random, r: ValidRequest,
                       cancel_after: int | None) -> tuple[int, bool]:
        await asyncio.sleep(0)
        stream = scheduler.schedule(r)
        count = 0
        async for event in stream:
            count += 1
            if cancel_after is not None and count >= cancel_after:
                await stream.aclose()
                return count, False
            if isinstance(event, EndEvent):
                return count, True
        raise AssertionError("stream ended without EndEvent")

    async def main() -> None:
        rng = random.Random(1234)
        observer = RecordingObserver()
        scheduler, client = make(num_blocks=24, block_size=4, observer=observer,
                                 max_batch_prefill_tokens=32, waiting_served_ratio=0.5,
                                 max_waiting_tokens=3)
        capacity = scheduler.allocator.total_blocks
        original_prefill = client.prefill

        async def checked_prefill(batch: pb.Batch, cached: pb.CachedBatch | None = None,
                                  metadata: Any = None, decode_ahead: bool = False) -> Any:
            assert scheduler.allocator.used_blocks <= capacity
            assert len(client.live_slots()) + sum(len(r.slots) for r in batch.requests) <= (
                capacity * 4)
            return await original_prefill(batch, cached, metadata, decode_ahead)

        client.prefill = checked_prefill  # type: ignore[method-assign]
        scheduler.start()
        plans = []
        for _ in range(60):
            r = req(rng.randint(1, 30), rng.randint(1, 40))
            cancel = rng.randint(1, 5) if rng.random() < 0.2 else None
            plans.append((r, cancel))
        tasks = []
        for r, cancel in plans:
            tasks.append(asyncio.create_task(consumer(scheduler, rng, r, cancel)))
            for _ in range(rng.randint(0, 20)):
                await asyncio.sleep(0)
        results = await asyncio.gather(*tasks)
        await scheduler.stop()
        for (r, _cancel), (count, finished) in zip(plans, results):
            if finished:
                assert count == r.stopping.max_new_tokens
        assert observer.blocks and max(used for used, _ in observer.blocks) <= capacity
        assert max(used for used, _ in observer.blocks) > capacity // 2  # the load was real
        assert scheduler.allocator.used_blocks == 0
        assert client.batches == {}

    run(main())


# ---- startup -----------------------------------------------------------------------------


@dataclass
class FakeWarmupClient:
    info_response: pb.InfoResponse
    supported: int | None
    batch: pb.Batch | None = None
    calls: list[str] = field(default_factory=list)

    async def service_discovery(self) -> list[str]:
        self.calls.append("service_discovery")
        return ["unix:///tmp/s-0"]

    async def clear_cache(self, batch_id: int | None = None) -> None:
        self.calls.append(f"clear_cache:{batch_id}")

    async def info(self) -> pb.InfoResponse:
        self.calls.append("info")
        return self.info_response

    async def warmup(self, batch: pb.Batch, max_input_tokens: int | None,
                     max_prefill_tokens: int, max_total_tokens: int | None) -> pb.WarmupResponse:
        self.calls.append("warmup")
        self.batch = batch
        total = max_total_tokens or 1024
        return pb.WarmupResponse(max_supported_total_tokens=self.supported,
                                 max_input_tokens=max_input_tokens or total - 1,
                                 max_total_tokens=total)


def info(block_size: int = 16) -> pb.InfoResponse:
    return pb.InfoResponse(block_size=block_size, max_position_embeddings=2048, vocab_size=100,
                           model_type="llama", dtype="float32", device_type="cpu",
                           eos_token_ids=[2])


def test_connect_and_warmup_sends_prefill_budget_in_pieces_with_slots() -> None:
    client = FakeWarmupClient(info(block_size=16), supported=8000)
    settings = SchedulerSettings(max_batch_prefill_tokens=1000, max_input_tokens=300,
                                 max_total_tokens=400)
    backend = CoreShardClient(client)  # type: ignore[arg-type]
    shard, batch_total, max_input, max_total = run(connect_and_warmup(backend, settings))
    assert client.calls == ["service_discovery", "clear_cache:None", "info", "warmup"]
    assert (batch_total, max_input, max_total) == (8000, 300, 400)
    assert shard.block_size == 16 and shard.eos_token_ids == (2,)
    assert client.batch is not None
    lengths = [len(r.input_ids) for r in client.batch.requests]
    assert lengths == [300, 300, 300, 100]
    slots = [s for r in client.batch.requests for s in r.slots]
    assert len(slots) == len(set(slots)) and min(slots) >= 16  # block 0 stays free
    for r in client.batch.requests:
        assert r.stopping_parameters.max_new_tokens == 400 - len(r.input_ids)
        assert len(r.slots) == len(r.input_ids) + r.stopping_parameters.max_new_tokens - 1
        assert r.stopping_parameters.ignore_eos_token and r.prefill_logprobs
        assert r.top_n_tokens == 20 and r.parameters.watermark
    scheduler_settings = resolve_settings(settings, shard, (batch_total, max_input, max_total))
    fake = CoreShardClient(FakeShardClient(num_slots=8000))  # type: ignore[arg-type]
    scheduler = Scheduler(fake, scheduler_settings)
    assert scheduler.allocator.num_blocks == 8000 // 16


def test_warmup_limits_are_checked() -> None:
    shard = shard_info(info(block_size=4), 16)
    small = to_warmup_result(pb.WarmupResponse(max_supported_total_tokens=100,
                                               max_input_tokens=50, max_total_tokens=200))
    with pytest.raises(StartupError, match="max_total_tokens=200"):
        resolve_limits(SchedulerSettings(max_batch_prefill_tokens=64, max_total_tokens=200),
                       shard, small)
    # Unset by the user: capped to what one request can hold (block 0 reserved).
    assert resolve_limits(SchedulerSettings(max_batch_prefill_tokens=64), shard, small) == (
        100, 50, 97)
    with pytest.raises(StartupError, match="max_batch_prefill_tokens"):
        resolve_limits(SchedulerSettings(max_batch_prefill_tokens=40, max_input_tokens=50),
                       shard, small)
    with pytest.raises(StartupError, match="max_batch_total_tokens"):
        resolve_limits(SchedulerSettings(max_batch_prefill_tokens=128), shard, to_warmup_result(
            pb.WarmupResponse(max_supported_total_tokens=100, max_input_tokens=50,
                              max_total_tokens=90)))


def test_mixed_prefill_admits_a_newcomer_at_the_next_step() -> None:
    """With shards that prefill beside the running batch, nobody waits for waiting_served_ratio."""

    async def main() -> None:
        observer = RecordingObserver()
        scheduler, client = make(observer=observer, waiting_served_ratio=1.0,
                                 max_waiting_tokens=1000, mixed_prefill=True)
        scheduler.start()
        first = asyncio.create_task(collect(scheduler.schedule(req(4, 20))))
        await wait_until(lambda: len(client.decodes()) >= 1)
        late = await collect(scheduler.schedule(req(4, 2)))
        long = await first
        await scheduler.stop()
        assert observer.concats == ["chunking"]
        assert len(late) == 2 and len(long) == 20
        prefill_index = [i for i, (n, _) in enumerate(client.calls) if n == "prefill"][1]
        # Joined right away (after at most the decode already in flight)...
        assert len([c for c in client.calls[:prefill_index] if c[0] == "decode"]) <= 2
        # ...and the running request advanced in that prefill, not in a separate decode.
        long_id = client.prefills()[0][0]
        assert any({long_id} < set(ids) for ids in client.decodes())
        assert scheduler.allocator.used_blocks == 0

    run(main())


def test_steps_let_the_shard_decode_ahead_only_while_nothing_waits() -> None:
    """A step done ahead would have to be redone apart from a newcomer's prompt: the scheduler
    asks for it only when the queue is empty after the step's admissions."""

    async def main() -> None:
        scheduler, client = make(max_batch_size=1, mixed_prefill=True)
        scheduler.start()
        first = asyncio.create_task(collect(scheduler.schedule(req(4, 6))))
        await wait_until(lambda: len(client.decodes()) >= 2)
        assert client.aheads == [True, True, True]  # alone: its prefill and decodes
        # The batch is full (max_batch_size=1), so the second request waits in the queue.
        second = asyncio.create_task(collect(scheduler.schedule(req(4, 2))))
        await first
        waited = len(client.aheads)
        await second
        await scheduler.stop()
        assert client.prefills()[1] == [1]  # the second ran after the first left
        assert False in client.aheads[3:waited]  # the first's steps while the second waited
        assert client.aheads[-1] is True  # the second's own, with nothing waiting

    run(main())


def test_mixed_steps_admit_small_prefills_and_a_long_prompt_alone() -> None:
    async def main() -> None:
        scheduler, client = make(mixed_prefill=True, max_step_prefill_tokens=12,
                                 max_batch_prefill_tokens=64)
        scheduler.start()
        first = asyncio.create_task(collect(scheduler.schedule(req(4, 30))))
        await wait_until(lambda: len(client.decodes()) >= 1)
        # Three 8-token prompts: only one fits each 12-token step next to the running row.
        mids = [asyncio.create_task(collect(scheduler.schedule(req(8, 3)))) for _ in range(3)]
        long_prompt = asyncio.create_task(collect(scheduler.schedule(req(40, 2))))
        results = await asyncio.gather(first, *mids, long_prompt)
        await scheduler.stop()
        assert [len(r) for r in results] == [30, 3, 3, 3, 2]
        joined = client.prefills()[1:]
        assert all(len(ids) == 1 for ids in joined) and len(joined) == 4

    run(main())


def test_step_prefill_budget_grows_with_a_deep_queue_only() -> None:
    s = SchedulerSettings(max_batch_prefill_tokens=4096, max_step_prefill_tokens=256)
    assert step_prefill_budget(s, 0) == 256
    assert step_prefill_budget(s, 256 * QUEUE_DRAIN_STEPS) == 256
    assert step_prefill_budget(s, 1000 * QUEUE_DRAIN_STEPS) == 1000
    assert step_prefill_budget(s, 10**6) == 4096  # never past --max-batch-prefill-tokens
    small = SchedulerSettings(max_batch_prefill_tokens=128, max_step_prefill_tokens=256)
    assert step_prefill_budget(small, 0) == 128


def test_step_prefill_budget_holds_while_a_backlog_lasts() -> None:
    s = SchedulerSettings(max_batch_prefill_tokens=4096, max_step_prefill_tokens=256)
    assert step_prefill_budget(s, 300, backlog_budget=1440) == 1440  # the queue shrank: held
    assert step_prefill_budget(s, 300 * QUEUE_DRAIN_STEPS, backlog_budget=1000) == 1000
    assert step_prefill_budget(s, 2000 * QUEUE_DRAIN_STEPS, backlog_budget=1000) == 2000
    assert step_prefill_budget(s, 0, backlog_budget=1440) == 256  # the backlog is gone: base
    assert step_prefill_budget(s, 100, backlog_budget=10**6) == 4096


def test_a_burst_drains_in_steps_of_the_size_it_started_with() -> None:
    async def main() -> None:
        scheduler, client = make(num_blocks=400, mixed_prefill=True, max_step_prefill_tokens=12,
                                 max_batch_prefill_tokens=64)
        scheduler.start()
        first = asyncio.create_task(collect(scheduler.schedule(req(4, 60))))
        await wait_until(lambda: len(client.decodes()) >= 1)
        # 40 prompts of 8 tokens (320) at once: budget 40. Had it shrunk with the queue, it would
        # be back at the base 12 after ~7 steps and admit one prompt a step next to the growing
        # running batch: 30 steps for the 40 (measured); held, 18.
        burst = [asyncio.create_task(collect(scheduler.schedule(req(8, 40)))) for _ in range(40)]
        results = await asyncio.gather(first, *burst)
        await scheduler.stop()
        assert [len(r) for r in results] == [60] + [40] * 40
        joined = [len(ids) for ids in client.prefills()[1:]]
        assert sum(joined) == 40
        assert len(joined) <= 20
        assert scheduler.allocator.used_blocks == 0

    run(main())


def test_mixed_steps_admit_more_per_step_while_a_deep_queue_waits() -> None:
    async def main() -> None:
        scheduler, client = make(num_blocks=160, mixed_prefill=True, max_step_prefill_tokens=12,
                                 max_batch_prefill_tokens=64)
        scheduler.start()
        first = asyncio.create_task(collect(scheduler.schedule(req(4, 40))))
        await wait_until(lambda: len(client.decodes()) >= 1)
        # 24 waiting 8-token prompts (192 tokens): the budget is 192 / 8 = 24, room for several
        # prompts next to the running row, where the base 12 admits one a step.
        queued = [asyncio.create_task(collect(scheduler.schedule(req(8, 3)))) for _ in range(24)]
        results = await asyncio.gather(first, *queued)
        await scheduler.stop()
        assert [len(r) for r in results] == [40] + [3] * 24
        joined = [len(ids) for ids in client.prefills()[1:]]
        assert joined[0] > 1 and max(joined) <= 3  # 24 - 1 running, in 4-token blocks: 3
        assert joined[-1] == 1  # the queue shallow again: back to the base budget
        assert sum(joined) == 24
        assert scheduler.allocator.used_blocks == 0

    run(main())
